//! The libp2p [`Transport`] over a [`Radio`].
//!
//! It hands libp2p plain byte pipes; the node upgrades them with Noise and
//! Yamux like any TCP connection, so every behaviour runs unchanged over
//! BLE.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::{BoxFuture, Ready};
use futures::io::{AsyncRead, AsyncWrite};
use futures::{FutureExt, StreamExt};
use libp2p_core::multiaddr::Multiaddr;
use libp2p_core::transport::{DialOpts, ListenerId, Transport, TransportError, TransportEvent};
use libp2p_identity::PeerId;

use crate::addr::{self, BleAddr, DeviceAddr};
use crate::advert::{Advert, peer_hint};
use crate::radio::{DataPath, Incoming, LinkIo, Radio};

/// How long a dial may take before it fails (BLE connection set-up takes a
/// few connection intervals; a busy radio much longer).
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(20);

/// A connection over a BLE link, before libp2p's upgrade.
pub struct BleStream {
    remote: DeviceAddr,
    path: DataPath,
    io: Box<dyn LinkIo>,
}

impl std::fmt::Debug for BleStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BleStream")
            .field("remote", &self.remote)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl BleStream {
    /// The device at the other end.
    pub fn remote(&self) -> DeviceAddr {
        self.remote
    }

    /// How the bytes travel.
    pub fn path(&self) -> DataPath {
        self.path
    }
}

impl AsyncRead for BleStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for BleStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_close(cx)
    }
}

enum ListenerState {
    Starting(BoxFuture<'static, io::Result<Incoming>>),
    Active(Incoming),
}

struct Listener {
    id: ListenerId,
    state: ListenerState,
}

/// The BLE transport. Listens on `/ip6zone/ble`, dials
/// `/ip6zone/ble-<device>` (see [`crate::addr`]).
pub struct BleTransport {
    radio: Arc<dyn Radio>,
    hint: [u8; 6],
    listener: Option<Listener>,
    events: VecDeque<TransportEvent<Ready<Result<BleStream, io::Error>>, io::Error>>,
}

impl std::fmt::Debug for BleTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BleTransport")
            .field("radio", &self.radio)
            .finish_non_exhaustive()
    }
}

impl BleTransport {
    /// A transport over `radio` for the node `local`.
    pub fn new(radio: Arc<dyn Radio>, local: &PeerId) -> Self {
        BleTransport {
            radio,
            hint: peer_hint(local),
            listener: None,
            events: VecDeque::new(),
        }
    }

    fn local_addr(&self) -> Multiaddr {
        addr::device_multiaddr(self.radio.address())
    }
}

impl Transport for BleTransport {
    type Output = BleStream;
    type Error = io::Error;
    type ListenerUpgrade = Ready<Result<BleStream, io::Error>>;
    type Dial = BoxFuture<'static, Result<BleStream, io::Error>>;

    fn listen_on(
        &mut self,
        id: ListenerId,
        addr: Multiaddr,
    ) -> Result<(), TransportError<Self::Error>> {
        match addr::parse(&addr) {
            Some(BleAddr::Listen) => {}
            Some(BleAddr::Device(d)) if d == self.radio.address() => {}
            _ => return Err(TransportError::MultiaddrNotSupported(addr)),
        }
        if self.listener.is_some() {
            return Err(TransportError::Other(io::Error::new(
                io::ErrorKind::AddrInUse,
                "the BLE radio is already listening",
            )));
        }
        let fut = self.radio.listen(Advert {
            psm: None,
            peer_hint: self.hint,
        });
        self.listener = Some(Listener {
            id,
            state: ListenerState::Starting(fut),
        });
        Ok(())
    }

    fn remove_listener(&mut self, id: ListenerId) -> bool {
        if self.listener.as_ref().is_some_and(|l| l.id == id) {
            let was_active = matches!(
                self.listener.take().map(|l| l.state),
                Some(ListenerState::Active(_))
            );
            if was_active {
                self.events.push_back(TransportEvent::AddressExpired {
                    listener_id: id,
                    listen_addr: self.local_addr(),
                });
            }
            self.events.push_back(TransportEvent::ListenerClosed {
                listener_id: id,
                reason: Ok(()),
            });
            true
        } else {
            false
        }
    }

    fn dial(
        &mut self,
        addr: Multiaddr,
        _opts: DialOpts,
    ) -> Result<Self::Dial, TransportError<Self::Error>> {
        let Some(BleAddr::Device(device)) = addr::parse(&addr) else {
            return Err(TransportError::MultiaddrNotSupported(addr));
        };
        let radio = self.radio.clone();
        Ok(async move {
            if device == radio.address() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "cannot dial our own radio",
                ));
            }
            let link = tokio::time::timeout(DIAL_TIMEOUT, radio.connect(device))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "BLE dial timed out"))??;
            Ok(BleStream {
                remote: link.remote,
                path: link.path,
                io: link.io,
            })
        }
        .boxed())
    }

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<TransportEvent<Self::ListenerUpgrade, Self::Error>> {
        if let Some(ev) = self.events.pop_front() {
            return Poll::Ready(ev);
        }
        let local = self.local_addr();
        let Some(listener) = self.listener.as_mut() else {
            return Poll::Pending;
        };
        let id = listener.id;
        match &mut listener.state {
            ListenerState::Starting(fut) => match fut.poll_unpin(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok(incoming)) => {
                    listener.state = ListenerState::Active(incoming);
                    Poll::Ready(TransportEvent::NewAddress {
                        listener_id: id,
                        listen_addr: local,
                    })
                }
                Poll::Ready(Err(e)) => {
                    self.listener = None;
                    Poll::Ready(TransportEvent::ListenerClosed {
                        listener_id: id,
                        reason: Err(e),
                    })
                }
            },
            ListenerState::Active(incoming) => match incoming.poll_next_unpin(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Some(Ok(link))) => {
                    let send_back_addr = addr::device_multiaddr(link.remote);
                    let stream = BleStream {
                        remote: link.remote,
                        path: link.path,
                        io: link.io,
                    };
                    Poll::Ready(TransportEvent::Incoming {
                        listener_id: id,
                        upgrade: futures::future::ready(Ok(stream)),
                        local_addr: local,
                        send_back_addr,
                    })
                }
                Poll::Ready(Some(Err(e))) => Poll::Ready(TransportEvent::ListenerError {
                    listener_id: id,
                    error: e,
                }),
                Poll::Ready(None) => {
                    self.listener = None;
                    self.events.push_back(TransportEvent::ListenerClosed {
                        listener_id: id,
                        reason: Ok(()),
                    });
                    Poll::Ready(TransportEvent::AddressExpired {
                        listener_id: id,
                        listen_addr: local,
                    })
                }
            },
        }
    }
}
