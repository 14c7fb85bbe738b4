//! fogmesh's own wire protocols and behaviours.
//!
//! Today this crate holds the routing [`policy`]: the single place where the
//! node decides how to reach a peer. Group messaging, sync, file transfer,
//! onion relaying and the mailbox join it as their own modules.
#![warn(missing_docs)]

pub mod files;
mod frame;
#[doc(hidden)]
pub mod fuzz;
pub mod groups;
pub mod length_prefix;
pub mod mailbox;
pub mod messages;
pub mod onion;
pub mod policy;
pub mod rate;
