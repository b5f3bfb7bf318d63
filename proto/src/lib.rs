//! The `videocall.v1` protobuf contract, generated at build time from the
//! `.proto` files next to this crate (`proto/videocall/v1/`).
//!
//! Layout:
//! - [`v1`]: messages, enums, and the tonic clients and servers of the three
//!   services (`CallService` for clients, `BusinessHook` implemented by the
//!   business service, `CallAdmin` for the business service and operators).
//! - [`codec`]: the codec the generated code uses (prost, small buffers).
//! - [`text`]: the characters a user id may hold, and escaping of text from
//!   the network for logs and terminals.
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, for server reflection.
//!
//! Business teams working in another language need only the `.proto` files.

pub mod codec;
pub mod text;

/// Generated code for package `videocall.v1`.
#[allow(missing_docs, missing_debug_implementations, clippy::all)]
pub mod v1 {
    tonic::include_proto!("videocall.v1");
}

/// The encoded `FileDescriptorSet` of every `.proto` file of the contract
/// (with its imports), for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/videocall_descriptor.bin"));
