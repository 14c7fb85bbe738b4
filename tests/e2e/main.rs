#![allow(unreachable_pub)]
//! End-to-end tests: real `fogmesh` processes on loopback, driven through
//! the CLI and the local API the way an operator drives them.

mod ble;
mod cli;
mod files;
mod groups;
mod mailbox;
mod messages;
mod nat;
mod node;
mod onion;
mod security;
mod stdout;
mod util;
mod web;
