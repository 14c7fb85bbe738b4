//! The request-response codec of fogmesh's own protocols (group sync,
//! files): one frame each way, an unsigned-varint length then that many
//! bytes, as libp2p's own protocols frame their messages.
//!
//! The framing itself is `fogmesh_protocols::length_prefix` (sans-IO,
//! fuzzed as `rr_frame`); this module reads and writes it on a stream.
//!
//! The frames are already encoded by `fogmesh_protocols` (versioned CBOR
//! with size-checked decoders); the codec only delimits them, with a limit
//! per direction checked before anything is allocated. A length over the
//! limit is an error (the stream is reset), never a truncation.

use std::io;
use std::marker::PhantomData;

use fogmesh_protocols::length_prefix::{MAX_PREFIX_LEN, encode_prefix, parse_prefix};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use libp2p::request_response;

/// A frame type the codec carries: a newtype over the encoded bytes, so
/// that one protocol's frames cannot be handed to another.
pub trait Frame: Send + 'static {
    /// Wraps received bytes.
    fn from_bytes(bytes: Vec<u8>) -> Self;
    /// The bytes to send.
    fn as_bytes(&self) -> &[u8];
    /// The received bytes, unwrapped.
    fn into_bytes(self) -> Vec<u8>;
}

/// Length-prefixed frames, requests up to `max_request` bytes and
/// responses up to `max_response`.
#[derive(Debug)]
pub struct FrameCodec<Req, Resp> {
    max_request: usize,
    max_response: usize,
    frames: PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp> Clone for FrameCodec<Req, Resp> {
    fn clone(&self) -> Self {
        FrameCodec {
            max_request: self.max_request,
            max_response: self.max_response,
            frames: PhantomData,
        }
    }
}

impl<Req, Resp> FrameCodec<Req, Resp> {
    /// A codec with these limits.
    pub fn new(max_request: usize, max_response: usize) -> Self {
        FrameCodec {
            max_request,
            max_response,
            frames: PhantomData,
        }
    }
}

/// Reads one frame of at most `max` bytes: the prefix byte by byte
/// (`fogmesh_protocols::length_prefix`, which the fuzz target `rr_frame`
/// runs), the length checked before the body is allocated.
pub async fn read_frame<T: AsyncRead + Unpin>(io: &mut T, max: usize) -> io::Result<Vec<u8>> {
    let mut prefix = [0u8; MAX_PREFIX_LEN];
    let mut n = 0;
    let len = loop {
        io.read_exact(&mut prefix[n..=n]).await?;
        n += 1;
        match parse_prefix(&prefix[..n], max) {
            Ok(Some((len, _))) => break len,
            Ok(None) => {}
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
    };
    let mut buf = vec![0; len];
    io.read_exact(&mut buf).await?;
    Ok(buf)
}

/// Writes one frame (refusing one over `max` bytes) and closes the write
/// side.
pub async fn write_frame<T: AsyncWrite + Unpin>(
    io: &mut T,
    frame: &[u8],
    max: usize,
) -> io::Result<()> {
    if frame.len() > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("frame of {} bytes is over the limit of {max}", frame.len()),
        ));
    }
    let mut len = [0u8; MAX_PREFIX_LEN];
    io.write_all(encode_prefix(frame.len(), &mut len)).await?;
    io.write_all(frame).await?;
    io.close().await
}

impl<Req: Frame, Resp: Frame> request_response::Codec for FrameCodec<Req, Resp> {
    type Protocol = StreamProtocol;
    type Request = Req;
    type Response = Resp;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Req>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, self.max_request).await.map(Req::from_bytes)
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Resp>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, self.max_response)
            .await
            .map(Resp::from_bytes)
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, req: Req) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, req.as_bytes(), self.max_request).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        resp: Resp,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, resp.as_bytes(), self.max_response).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_those_of_unsigned_varint() {
        for len in [
            0usize,
            1,
            127,
            128,
            255,
            16_384,
            1 << 21,
            (1 << 35) + 3,
            usize::MAX,
        ] {
            let mut a = unsigned_varint::encode::usize_buffer();
            let mut b = [0u8; MAX_PREFIX_LEN];
            let theirs = unsigned_varint::encode::usize(len, &mut a);
            assert_eq!(encode_prefix(len, &mut b), theirs);
            assert_eq!(
                parse_prefix(theirs, usize::MAX),
                Ok(Some((len, theirs.len())))
            );
        }
    }

    #[tokio::test]
    async fn frames_round_trip_and_limits_hold() {
        let mut wire = Vec::new();
        write_frame(&mut futures::io::Cursor::new(&mut wire), b"hello", 16)
            .await
            .expect("write");
        assert_eq!(wire, b"\x05hello");
        let got = read_frame(&mut futures::io::Cursor::new(&wire), 16)
            .await
            .expect("read");
        assert_eq!(got, b"hello");
        // Over the reader's limit: refused before allocating.
        let err = read_frame(&mut futures::io::Cursor::new(&wire), 4)
            .await
            .expect_err("too big");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        // A huge announced length with no body is refused, not allocated.
        let mut huge = Vec::new();
        let mut b = unsigned_varint::encode::usize_buffer();
        huge.extend_from_slice(unsigned_varint::encode::usize(usize::MAX >> 1, &mut b));
        assert!(
            read_frame(&mut futures::io::Cursor::new(&huge), 1 << 20)
                .await
                .is_err()
        );
        // A truncated body is an error, not a short frame.
        assert!(
            read_frame(&mut futures::io::Cursor::new(b"\x05hel"), 16)
                .await
                .is_err()
        );
        // A non-minimal prefix is refused.
        assert!(
            read_frame(&mut futures::io::Cursor::new(b"\x85\x00hello"), 16)
                .await
                .is_err()
        );
        // The writer refuses what the peer would refuse.
        let mut sink = Vec::new();
        assert!(
            write_frame(&mut futures::io::Cursor::new(&mut sink), &[0; 17], 16)
                .await
                .is_err()
        );
    }
}
