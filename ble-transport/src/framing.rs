//! A byte pipe over a packet channel.
//!
//! Radios move packets of at most one MTU. [`PacketIo`] turns a pair of
//! bounded packet channels into the `AsyncRead + AsyncWrite` byte pipe that
//! libp2p's upgrade runs on: each write sends at most one packet (so the
//! channel's bound is the backpressure), reads return packet contents in
//! order. The simulated radio and the GATT fallback both use it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures::channel::mpsc;
use futures::io::{AsyncRead, AsyncWrite};
use futures::{Sink, Stream};

/// One end of a packet link, as a byte pipe.
#[derive(Debug)]
pub struct PacketIo {
    tx: Option<mpsc::Sender<Bytes>>,
    rx: mpsc::Receiver<io::Result<Bytes>>,
    pending: Bytes,
    max_packet: usize,
    failed: Option<io::ErrorKind>,
}

impl PacketIo {
    /// Wraps the channels: `tx` takes outgoing packets of at most
    /// `max_packet` bytes, `rx` yields incoming packets, or an error when
    /// the link fails (end of stream is a clean close by the peer).
    pub fn new(
        tx: mpsc::Sender<Bytes>,
        rx: mpsc::Receiver<io::Result<Bytes>>,
        max_packet: usize,
    ) -> Self {
        PacketIo {
            tx: Some(tx),
            rx,
            pending: Bytes::new(),
            max_packet: max_packet.max(1),
            failed: None,
        }
    }
}

impl AsyncRead for PacketIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            if !self.pending.is_empty() {
                let n = buf.len().min(self.pending.len());
                let chunk = self.pending.split_to(n);
                buf[..n].copy_from_slice(&chunk);
                return Poll::Ready(Ok(n));
            }
            if let Some(kind) = self.failed {
                return Poll::Ready(Err(kind.into()));
            }
            match ready!(Pin::new(&mut self.rx).poll_next(cx)) {
                Some(Ok(p)) => self.pending = p,
                Some(Err(e)) => {
                    self.failed = Some(e.kind());
                    return Poll::Ready(Err(e));
                }
                None => return Poll::Ready(Ok(0)),
            }
        }
    }
}

fn broken() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "BLE link closed")
}

impl AsyncWrite for PacketIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let max = self.max_packet;
        let Some(tx) = self.tx.as_mut() else {
            return Poll::Ready(Err(broken()));
        };
        ready!(Pin::new(&mut *tx).poll_ready(cx)).map_err(|_| broken())?;
        let n = buf.len().min(max);
        Pin::new(tx)
            .start_send(Bytes::copy_from_slice(&buf[..n]))
            .map_err(|_| broken())?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.tx.as_mut() {
            Some(tx) => Pin::new(tx).poll_flush(cx).map_err(|_| broken()),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(tx) = self.tx.as_mut() {
            let _ = ready!(Pin::new(tx).poll_close(cx));
        }
        self.tx = None;
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};

    #[tokio::test]
    async fn segments_and_reassembles() {
        let (tx, mut out) = mpsc::channel::<Bytes>(4);
        let (mut inj, rx) = mpsc::channel::<io::Result<Bytes>>(4);
        let mut io = PacketIo::new(tx, rx, 10);
        let data: Vec<u8> = (0..35u8).collect();
        let writer = async {
            io.write_all(&data).await.expect("write");
            io.close().await.expect("close");
            io
        };
        let reader = async {
            let mut got = Vec::new();
            while let Some(p) = out.next().await {
                assert!(p.len() <= 10);
                got.extend_from_slice(&p);
            }
            got
        };
        let (mut io, got) = futures::join!(writer, reader);
        assert_eq!(got, data);
        use futures::SinkExt;
        inj.send(Ok(Bytes::from_static(b"hello ")))
            .await
            .expect("inject");
        inj.send(Ok(Bytes::from_static(b"world")))
            .await
            .expect("inject");
        inj.send(Err(io::ErrorKind::ConnectionReset.into()))
            .await
            .expect("inject");
        let mut buf = vec![0u8; 11];
        io.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"hello world");
        let e = io.read(&mut buf).await.expect_err("reset");
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    }
}
