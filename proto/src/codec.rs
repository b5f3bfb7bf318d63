//! The protobuf codec of every generated client and server: prost's, with
//! small initial buffers.
//!
//! tonic starts each stream's encode and decode buffers at 8 KiB; these start
//! at 256 bytes. The contract's messages are a few hundred bytes (16 KiB at
//! most, enforced by the call service), and a call service holds one
//! long-lived stream per connected device, so those buffers were a large
//! share of the memory of an idle device. Buffers still grow when a message
//! needs it.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Initial buffer per stream and direction.
pub const BUFFER_SIZE: usize = 256;
/// tonic's default: how much encoded output to gather before yielding.
pub const YIELD_THRESHOLD: usize = 32 * 1024;

/// prost encoding with [`BUFFER_SIZE`] buffers.
#[derive(Debug, Clone, Copy)]
pub struct SmallBufferCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
    }
}
