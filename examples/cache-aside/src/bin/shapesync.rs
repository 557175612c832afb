//! The stock `shapesync` command line (every built-in sink), so that this example's test
//! can run shapesync as a process and SIGKILL it. Deployments run `shapesync` itself.

fn main() -> std::process::ExitCode {
    shapesync_cli::run_with(shapesync_cli::builtin_registry())
}
