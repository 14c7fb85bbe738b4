//! The `fogmesh` binary: see the library's `cli` module.

fn main() -> std::process::ExitCode {
    fogmesh::cli::main()
}
