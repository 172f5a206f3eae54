//! The `kiln` command line.

use anyhow::Result;
use clap::{Parser, Subcommand};
use kiln::device::{list_adapters, Device, DeviceReport, DeviceSelector};

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Deep-learning training on any GPU through wgpu"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the adapter Kiln would use, its backend, type and the limits that matter.
    Info {
        /// Also list every adapter found, usable or not.
        #[arg(long)]
        all: bool,
    },
}

fn main() -> std::process::ExitCode {
    let result = match Cli::parse().command {
        Command::Info { all } => info(all),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole cause chain on one line, without a backtrace.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn info(all: bool) -> Result<()> {
    let selector = DeviceSelector::from_env()?;
    if all {
        println!("adapters found (best first):");
        for (adapter, unusable) in list_adapters(&selector) {
            let note = unusable
                .map(|r| format!(" [unusable: {r}]"))
                .unwrap_or_default();
            println!(
                "  {} ({:?}, {:?}){note}",
                adapter.name, adapter.backend, adapter.device_type
            );
        }
        println!();
    }
    let device = Device::with_selector(&selector)?;
    println!("{}", DeviceReport(&device));
    Ok(())
}
