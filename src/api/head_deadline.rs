//! A client has a few seconds to send its first request head (slowloris clients are cut off).
//! actix-web's own timer answers 408 with an empty body, written below every middleware; this
//! watch answers with the JSON envelope, like every other error of the service. actix-web's
//! timer stays, later, as a backstop.

use std::any::Any;
use std::io::Write;
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Extensions;
use serde_json::json;
use tokio::sync::{Notify, oneshot};

/// Kept in the connection's data: the first request says it arrived; dropped with the
/// connection, it ends the watch.
pub struct HeadWatch {
    arrived: Arc<Notify>,
    _open: oneshot::Sender<()>,
}

impl HeadWatch {
    pub fn head_arrived(&self) {
        self.arrived.notify_one();
    }
}

/// Starts watching a new connection: without a request head within `deadline`, it gets a JSON
/// 408 and is closed.
pub fn watch(connection: &dyn Any, data: &mut Extensions, deadline: Duration) {
    let Some(tcp) = connection.downcast_ref::<actix_web::rt::net::TcpStream>() else {
        return;
    };
    // A second handle on the socket, to answer on it and shut it down.
    let Ok(socket) = tcp.as_fd().try_clone_to_owned() else {
        return; // out of descriptors: actix-web's own timer still cuts the client off
    };
    let arrived = Arc::new(Notify::new());
    let (open, closed) = oneshot::channel();
    data.insert(HeadWatch {
        arrived: Arc::clone(&arrived),
        _open: open,
    });
    actix_web::rt::spawn(async move {
        tokio::select! {
            () = arrived.notified() => {}
            _ = closed => {}
            () = tokio::time::sleep(deadline) => time_out(std::net::TcpStream::from(socket), deadline),
        }
    });
}

/// Nothing has been written on the connection yet (no request, no response): the 408 goes
/// out whole, then the socket is shut so that the server's side of it ends too.
fn time_out(mut socket: std::net::TcpStream, deadline: Duration) {
    let request_id = uuid::Uuid::new_v4().to_string();
    let body = json!({
        "error": {
            "code": "request_timeout",
            "message": format!(
                "the request head did not arrive within {} seconds",
                deadline.as_secs()
            ),
            "request_id": request_id,
        }
    })
    .to_string();
    let response = format!(
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {}\r\nx-request-id: {request_id}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    // A few hundred bytes into an empty send buffer: written at once, or the client is gone.
    let _ = socket.write_all(response.as_bytes());
    let _ = socket.shutdown(Shutdown::Both);
}
