//! The simulated radio: an in-process [`Medium`] for tests and the
//! simulator, and the same medium across processes over a unix socket.

mod medium;
mod socket;

pub use medium::{DeviceInfo, LinkModel, Medium, Position, SimRadio};
#[doc(hidden)]
pub use socket::fuzz_line;
pub use socket::{AdminRequest, MAX_LINE, SocketRadio, admin, serve};
