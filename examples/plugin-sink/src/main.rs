//! `shapesync` with one more sink type: the stock command line over a registry that
//! lists the built-ins this crate enables (`shapesync-cli` without default features: the
//! `electric` source and the transforms, no built-in sink) plus `json_file`.

fn main() -> std::process::ExitCode {
    let mut registry = shapesync_cli::builtin_registry();
    shapesync_example_plugin_sink::register(&mut registry);
    shapesync_cli::run_with(registry)
}
