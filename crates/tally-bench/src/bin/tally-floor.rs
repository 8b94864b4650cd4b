//! `tally-floor [--listen 127.0.0.1:7392]`: serves the floor (see the crate docs) until
//! killed. Prints `tally-floor listening on http://ADDR` once bound (port 0 picks one).

use std::sync::Arc;

use axum::serve::ListenerExt as _;

/// The allocator tally ships with, so the floor differs from tally only in what a check does.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let mut args = std::env::args().skip(1);
    let mut listen = "127.0.0.1:7392".to_owned();
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--listen", Some(addr)) => listen = addr,
            _ => {
                eprintln!("usage: tally-floor [--listen HOST:PORT]");
                return std::process::ExitCode::from(2);
            }
        }
    }
    // Same runtime as `tally serve`: multi-thread, one worker per core.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    let result: std::io::Result<()> = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&listen).await?;
        println!("tally-floor listening on http://{}", listener.local_addr()?);
        let floor = Arc::new(tally_bench::Floor::default());
        // Like `tally serve`: no Nagle delay on replies.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, tally_bench::router(floor)).await
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tally-floor: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
