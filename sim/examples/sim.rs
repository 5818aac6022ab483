//! `accord sim` without building the service: `cargo run -p accord-sim --release --example sim -- --seeds 0..100`.

use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(name = "sim", about = "accord's deterministic simulator")]
struct Cli {
    #[command(flatten)]
    args: accord_sim::SimArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match accord_sim::run_cli(&cli.args, &mut std::io::stdout().lock()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("sim: error: {e}");
            ExitCode::from(2)
        }
    }
}
