//! patchbay: connects assistants (bots) to the chat platforms where people work.

mod admin;
mod assistants;
mod cli;
mod config;
mod hooks;
mod http_server;
mod kinds;
mod metrics;
mod pipeline;
mod registry;
mod seal;
mod server;
mod store;
mod supervisor;

/// mimalloc for Rust's allocations; the crate's `override` feature also gives it the C
/// `malloc` of SQLite and libc (docs/dependencies.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cli::main()
}
