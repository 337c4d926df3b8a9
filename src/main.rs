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

fn main() -> std::process::ExitCode {
    cli::main()
}
