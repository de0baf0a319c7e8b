//! `libdlm.so.3`: libdlm's threaded variant (`dlm_pthread_init`, `lock_resource`; a waiting call leaves the outcome in the status block), built from [`dlm_libdlm`].
#![allow(unsafe_code, reason = "exported C functions")]

dlm_libdlm::exports!(threaded);
