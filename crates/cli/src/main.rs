//! The `shapesync` binary with the built-in components.

fn main() -> std::process::ExitCode {
    shapesync_cli::run_with(shapesync_cli::builtin_registry())
}
