//! The HTTP floor for `bench/`: an actix-web hello world, `GET /` answering `ok`, against which
//! maestra's `/health` is compared in the same run.
//!
//!     cargo run --release --example hello -- [PORT] [WORKERS]
//!
//! Prints the port it listens on (127.0.0.1; PORT 0, the default, picks a free one). WORKERS
//! defaults to actix-web's own default (one per core), as `maestra serve` does.

use actix_web::{App, HttpResponse, HttpServer, web};

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let port: u16 = args.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let workers: Option<usize> = args.next().and_then(|w| w.parse().ok());
    let mut server = HttpServer::new(|| {
        App::new().route(
            "/",
            web::get().to(|| async { HttpResponse::Ok().body("ok") }),
        )
    });
    if let Some(workers) = workers {
        server = server.workers(workers);
    }
    let server = server.bind(("127.0.0.1", port))?;
    let port = server.addrs().first().map_or(port, |a| a.port());
    println!("{port}");
    server.run().await
}
