//! A raw client of the browser edge: the WebSocket session, frame by
//! frame, as a browser's script would speak it (JSON text frames).

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a test waits for one frame.
const FRAME_WAIT: Duration = Duration::from_secs(10);

/// One socket on the web edge.
#[derive(Debug)]
pub struct WebDevice {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    seq: u64,
}

/// How the server ended a socket: its close code and reason.
pub type Closed = (u16, String);

/// Opens a socket at `web_url`'s session with `origin` (if any) and the
/// subprotocol; the HTTP status when the upgrade is refused.
pub async fn open(web_url: &str, origin: Option<&str>) -> Result<WebDevice, u16> {
    let url = format!(
        "{}{}",
        web_url.replacen("http", "ws", 1),
        call_service::web::SESSION_PATH
    );
    let mut req = url.into_client_request().expect("a request");
    req.headers_mut().insert(
        "sec-websocket-protocol",
        call_service::web::SUBPROTOCOL.parse().expect("a header"),
    );
    if let Some(o) = origin {
        req.headers_mut()
            .insert("origin", o.parse().expect("a header"));
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(WebDevice { ws, seq: 0 }),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
        Err(e) => panic!("cannot reach the web edge: {e}"),
    }
}

/// A development-mode device of `user`, past its `Connected`.
pub async fn device(web_url: &str, user: &str) -> (WebDevice, Value) {
    let mut d = open(web_url, None).await.expect("upgraded");
    d.send(json!({ "devUserId": user })).await;
    let connected = d.next().await.expect("a message");
    assert!(connected.get("connected").is_some(), "{connected}");
    (d, connected["connected"].clone())
}

impl WebDevice {
    /// Sends one JSON text frame.
    pub async fn send(&mut self, msg: Value) {
        self.send_raw(Message::text(msg.to_string())).await;
    }

    pub async fn send_raw(&mut self, msg: Message) {
        self.ws.send(msg).await.expect("sent");
    }

    /// The next message, or how the server closed the socket.
    pub async fn next(&mut self) -> Result<Value, Closed> {
        loop {
            let frame = tokio::time::timeout(FRAME_WAIT, self.ws.next())
                .await
                .expect("a frame in time");
            match frame {
                Some(Ok(Message::Text(t))) => {
                    return Ok(serde_json::from_str(&t).expect("JSON from the server"));
                }
                Some(Ok(Message::Close(c))) => {
                    return Err(c.map_or((1005, String::new()), |c| {
                        (u16::from(c.code), c.reason.to_string())
                    }));
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err((1006, e.to_string())),
                None => return Err((1006, "ended".into())),
            }
        }
    }

    /// Sends a control and returns its result (events before it are
    /// returned too, in order).
    pub async fn control(
        &mut self,
        event_type: &str,
        peer: &str,
        fields: Value,
    ) -> (Value, Vec<Value>) {
        self.seq += 1;
        let mut control = json!({
            "seq": self.seq,
            "eventType": format!("EVENT_TYPE_{event_type}"),
            "peerUserId": peer,
        });
        if let (Some(c), Some(f)) = (control.as_object_mut(), fields.as_object()) {
            c.extend(f.clone());
        }
        self.send(json!({ "control": control })).await;
        let mut before = Vec::new();
        loop {
            let msg = self.next().await.expect("open");
            if let Some(r) = msg.get("result") {
                assert_eq!(r["seq"], json!(self.seq.to_string()), "{msg}");
                return (r.clone(), before);
            }
            before.push(msg);
        }
    }

    /// The next message, which must be an event; returned as its fields.
    pub async fn event(&mut self) -> Value {
        let msg = self.next().await.expect("open");
        msg.get("event")
            .cloned()
            .unwrap_or_else(|| panic!("not an event: {msg}"))
    }

    /// Drops the connection without a close frame (a network fault).
    pub fn drop_connection(self) {
        drop(self.ws);
    }
}
