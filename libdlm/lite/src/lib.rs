//! `libdlm_lt.so.3`: libdlm's "lite" variant (no pthread calls; a waiting call returns -1 with `errno` when refused), built from [`dlm_libdlm`].
#![allow(unsafe_code, reason = "exported C functions")]

dlm_libdlm::exports!(lite);
