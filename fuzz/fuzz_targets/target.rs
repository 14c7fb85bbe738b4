//! One source for every fuzz target: the binary's name picks the body from
//! the registries of `fogmesh_protocols::fuzz` and `fogmesh_ble::fuzz`.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

fn body() -> fn(&[u8]) {
    static BODY: OnceLock<fn(&[u8])> = OnceLock::new();
    *BODY.get_or_init(|| {
        let name = env!("CARGO_BIN_NAME");
        fogmesh_protocols::fuzz::target(name)
            .map(|t| t.run)
            .or_else(|| {
                fogmesh_ble::fuzz::TARGETS
                    .iter()
                    .find(|t| t.0 == name)
                    .map(|t| t.1)
            })
            .unwrap_or_else(|| panic!("no fuzz target called {name}"))
    })
}

fuzz_target!(|data: &[u8]| body()(data));
