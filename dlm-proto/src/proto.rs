//! The generated gRPC types and services of `proto/dlm/v1/dlm.proto`.

#![expect(missing_docs, clippy::all, reason = "generated code")]

tonic::include_proto!("dlm.v1");
