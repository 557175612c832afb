//! The `shapesync` binary with the built-in components.

/// mimalloc: measurably less fragmentation than the system allocator on large syncs
/// (see docs/PERFORMANCE.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    shapesync_cli::run_with(shapesync_cli::builtin_registry())
}
