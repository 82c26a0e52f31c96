//! [`HttpAgent`]: the controller's client of one agent's HTTP API (blocking, ureq), the
//! production implementation of [`AgentApi`].
//!
//! Status mapping: 2xx with a body of the documented type is the answer; 4xx is
//! [`AgentError::Refused`] (the agent changed nothing); 5xx is [`AgentError::Failed`]; a
//! connection or timeout error is [`AgentError::Unreachable`]; a body that is not the
//! documented JSON is [`AgentError::BadReply`].

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::agent_api::{AgentApi, AgentError};
use crate::auth::Token;
use crate::proto::{
    ApiError, HostName, HostReport, IncomingReady, MigrationId, MigrationRecord, PrepareIncoming,
    StartOutgoing, StartVm, VmName, VmReport,
};

/// Largest reply read, bytes.
const MAX_REPLY: u64 = 16 << 20;

/// One agent over HTTP.
pub struct HttpAgent {
    host: HostName,
    base: String,
    bearer: String,
    http: ureq::Agent,
}

impl std::fmt::Debug for HttpAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpAgent")
            .field("host", &self.host)
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl HttpAgent {
    /// A client of the agent of `host` at `base` (`http://IP:PORT`), whose calls each take at
    /// most `timeout` (connecting included; starting a VM process takes about a second).
    pub fn new(host: HostName, base: &str, token: &Token, timeout: Duration) -> HttpAgent {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(timeout))
            .timeout_connect(Some(timeout.min(Duration::from_secs(3))))
            .build();
        HttpAgent {
            host,
            base: base.trim_end_matches('/').to_string(),
            bearer: token.bearer(),
            http: config.into(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn unreachable(&self, e: ureq::Error) -> AgentError {
        AgentError::Unreachable {
            host: self.host.clone(),
            reason: e.to_string(),
        }
    }

    fn reply<T: DeserializeOwned>(
        &self,
        sent: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<T, AgentError> {
        let mut resp = sent.map_err(|e| self.unreachable(e))?;
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_REPLY)
            .read_to_string()
            .map_err(|e| self.unreachable(e))?;
        let error_line = || {
            serde_json::from_str::<ApiError>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| body.chars().take(200).collect())
        };
        match status {
            200..=299 => serde_json::from_str(&body).map_err(|e| AgentError::BadReply {
                host: self.host.clone(),
                reason: format!("{e} in {:?}", body.chars().take(200).collect::<String>()),
            }),
            400..=499 => Err(AgentError::Refused {
                host: self.host.clone(),
                status,
                error: error_line(),
            }),
            _ => Err(AgentError::Failed {
                host: self.host.clone(),
                status,
                error: error_line(),
            }),
        }
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, AgentError> {
        self.reply(
            self.http
                .get(self.url(path))
                .header("Authorization", &self.bearer)
                .call(),
        )
    }

    fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, AgentError> {
        let req = self
            .http
            .post(self.url(path))
            .header("Authorization", &self.bearer);
        self.reply(match body {
            Some(b) => req.send_json(b),
            None => req.send_empty(),
        })
    }
}

impl AgentApi for HttpAgent {
    fn host(&self) -> &HostName {
        &self.host
    }

    fn report(&self) -> Result<HostReport, AgentError> {
        self.get("/report")
    }

    fn start_vm(&self, vm: &StartVm) -> Result<VmReport, AgentError> {
        self.post("/vms", Some(vm))
    }

    fn stop_vm(&self, vm: &VmName) -> Result<(), AgentError> {
        let sent = self
            .http
            .delete(self.url(&format!("/vms/{}", vm.0)))
            .header("Authorization", &self.bearer)
            .call();
        self.reply::<serde_json::Value>(sent).map(drop)
    }

    fn prepare_incoming(&self, order: &PrepareIncoming) -> Result<IncomingReady, AgentError> {
        self.post("/migrations/incoming", Some(order))
    }

    fn start_outgoing(&self, order: &StartOutgoing) -> Result<MigrationRecord, AgentError> {
        self.post("/migrations/outgoing", Some(order))
    }

    fn migration(&self, id: MigrationId) -> Result<MigrationRecord, AgentError> {
        self.get(&format!("/migrations/{}", id.0))
    }

    fn cancel_migration(&self, id: MigrationId) -> Result<MigrationRecord, AgentError> {
        self.post::<(), _>(&format!("/migrations/{}/cancel", id.0), None)
    }

    fn standby(&self) -> Result<HostReport, AgentError> {
        self.post::<(), _>("/standby", None)
    }

    fn wake(&self) -> Result<HostReport, AgentError> {
        self.post::<(), _>("/wake", None)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpListener;

    use super::*;

    /// A server that answers one request with `status` and `body`, and records the request.
    fn canned(status: u16, body: &'static str) -> (String, std::thread::JoinHandle<String>) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", l.local_addr().expect("addr"));
        let h = std::thread::spawn(move || {
            let (mut s, _) = l.accept().expect("accept");
            let mut req = vec![0u8; 8192];
            let n = s.read(&mut req).expect("read");
            let reply = format!(
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            s.write_all(reply.as_bytes()).expect("write");
            String::from_utf8_lossy(&req[..n]).into_owned()
        });
        (url, h)
    }

    fn client(url: &str) -> HttpAgent {
        HttpAgent::new(
            HostName("h1".into()),
            url,
            &Token::new("tok").expect("token"),
            Duration::from_secs(5),
        )
    }

    #[test]
    fn statuses_map_to_refused_failed_and_bad_reply() {
        let (url, h) = canned(409, r#"{"error":"in standby"}"#);
        match client(&url).standby() {
            Err(AgentError::Refused {
                status: 409, error, ..
            }) => assert_eq!(error, "in standby"),
            other => panic!("{other:?}"),
        }
        let req = h.join().expect("server");
        assert!(req.starts_with("POST /standby "), "{req}");
        assert!(
            req.contains("authorization: Bearer tok") || req.contains("Authorization: Bearer tok"),
            "{req}"
        );

        let (url, h) = canned(500, r#"{"error":"boom"}"#);
        assert!(matches!(
            client(&url).wake(),
            Err(AgentError::Failed { status: 500, .. })
        ));
        h.join().expect("server");

        let (url, h) = canned(200, "not json");
        assert!(matches!(
            client(&url).report(),
            Err(AgentError::BadReply { .. })
        ));
        h.join().expect("server");

        let (url, h) = canned(200, r#"{"migration": 3}"#);
        assert!(matches!(
            client(&url).migration(MigrationId(3)),
            Err(AgentError::BadReply { .. })
        ));
        let req = h.join().expect("server");
        assert!(req.starts_with("GET /migrations/3 "), "{req}");
    }

    #[test]
    fn a_closed_port_is_unreachable() {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        assert!(matches!(
            client(&format!("http://127.0.0.1:{port}")).report(),
            Err(AgentError::Unreachable { .. })
        ));
    }
}
