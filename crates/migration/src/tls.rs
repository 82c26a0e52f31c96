//! Mutual TLS (1.3 only, rustls) for the network transports, as a tunnel around them.
//!
//! ```text
//!  source process                                   destination process
//!  migrate() ─unix─► SourceTunnel ══TLS/TCP══► DestTunnel ─unix─► receive()  
//!            (private dir)   client cert + CA      server cert + CA   (private dir)
//! ```
//!
//! The engine and the transports are unchanged: they speak the clear protocol over a Unix
//! socket in a directory only this user can enter, and each connection they open (the
//! control stream, every multi-tcp data stream) becomes one TLS connection. Both ends present
//! a certificate and check the other's against the cluster's CA: a peer without one, with one
//! of another CA, or with an expired one never reaches the protocol. The destination logs
//! such a connection and keeps waiting, as for any stray connection. Zero-copy `sendmsg`
//! cannot encrypt, so multi-tcp pays a copy through the tunnel (measured in the report).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use tracing::{info, warn};

use crate::conn::Endpoint;
use crate::error::MigrationError;

/// The three PEM files of one end: its certificate chain, its private key and the CA that
/// signs every certificate of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// Certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// Private key of the leaf (PEM, PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The cluster CA (PEM); the peer's certificate must chain to it.
    pub ca: PathBuf,
}

/// Why TLS could not be set up or a TLS connection failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("reading the TLS {what} {path}")]
    Load {
        /// certificate, key or CA.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// rustls refused the configuration (key not matching the certificate, bad CA).
    #[error("TLS configuration")]
    Config(#[source] rustls::Error),
    /// The tunnel's local socket could not be set up.
    #[error("TLS tunnel setup")]
    Tunnel(#[source] io::Error),
}

/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS connections in their handshake at once on the destination; more are closed.
const MAX_HANDSHAKES: usize = 16;

fn load_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> TlsError + 'a {
    move |source| TlsError::Load {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn pem_err(e: rustls::pki_types::pem::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

fn load(
    files: &TlsFiles,
) -> Result<
    (
        Vec<CertificateDer<'static>>,
        PrivateKeyDer<'static>,
        RootCertStore,
    ),
    TlsError,
> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(pem_err)
        .map_err(load_err("certificate", &files.cert))?;
    if certs.is_empty() {
        return Err(load_err("certificate", &files.cert)(io::Error::new(
            io::ErrorKind::InvalidData,
            "no certificate in the file",
        )));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(pem_err)
        .map_err(load_err("key", &files.key))?;
    let mut roots = RootCertStore::empty();
    let cas: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.ca)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(pem_err)
        .map_err(load_err("CA", &files.ca))?;
    for ca in cas {
        roots.add(ca).map_err(TlsError::Config)?;
    }
    if roots.is_empty() {
        return Err(load_err("CA", &files.ca)(io::Error::new(
            io::ErrorKind::InvalidData,
            "no CA certificate in the file",
        )));
    }
    Ok((certs, key, roots))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The source's TLS client configuration: TLS 1.3, our certificate, the peer checked
/// against the CA.
pub fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, TlsError> {
    let (certs, key, roots) = load(files)?;
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(TlsError::Config)?;
    Ok(Arc::new(cfg))
}

/// The destination's TLS server configuration: TLS 1.3, our certificate, a client
/// certificate required and checked against the CA.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let (certs, key, roots) = load(files)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| TlsError::Config(rustls::Error::General(e.to_string())))?;
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(TlsError::Config)?;
    Ok(Arc::new(cfg))
}

/// A directory only this user can enter, removed on drop, for a tunnel's clear-text socket.
#[derive(Debug)]
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn new(tag: &str) -> io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let base = std::env::temp_dir();
        for i in 0..100u32 {
            let p = base.join(format!("fastmig-tls-{tag}-{}-{i}", std::process::id()));
            match std::fs::DirBuilder::new().mode(0o700).create(&p) {
                Ok(()) => return Ok(Self(p)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "no free private directory name",
        ))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The source's end: a local Unix endpoint for the engine; every connection to it becomes a
/// TLS connection to the destination. Stops on drop.
#[derive(Debug)]
pub struct SourceTunnel {
    endpoint: Endpoint,
    error: Arc<Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
    _dir: PrivateDir,
}

impl SourceTunnel {
    /// Starts a tunnel to the destination at `dest` (a TCP address; its certificate must name
    /// that IP address).
    pub fn start(dest: SocketAddr, config: Arc<ClientConfig>) -> Result<Self, TlsError> {
        let dir = PrivateDir::new("src").map_err(TlsError::Tunnel)?;
        let path = dir.0.join("out.sock");
        let local = UnixListener::bind(&path).map_err(TlsError::Tunnel)?;
        local.set_nonblocking(true).map_err(TlsError::Tunnel)?;
        let error = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (err, halt) = (Arc::clone(&error), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !halt.load(Ordering::Relaxed) {
                match local.accept() {
                    Ok((plain, _)) => {
                        let (config, err) = (Arc::clone(&config), Arc::clone(&err));
                        std::thread::spawn(move || {
                            // Recorded before `plain` closes: the engine asks for the reason
                            // as soon as it sees the close.
                            if let Err(e) = client_side(&plain, dest, config) {
                                let mut slot = err.lock().unwrap_or_else(|p| p.into_inner());
                                slot.get_or_insert(e.to_string());
                            }
                            drop(plain);
                        });
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(_) => break,
                }
            }
        });
        Ok(Self {
            endpoint: Endpoint::Unix(path),
            error,
            stop,
            _dir: dir,
        })
    }

    /// Where the engine connects.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Replaces a migration error by the TLS failure that caused it, if one did: a refused
    /// certificate reaches the engine only as a closed stream.
    pub fn explain(&self, e: MigrationError) -> MigrationError {
        let tls = self.error.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match tls {
            Some(reason) => MigrationError::TransportSetup {
                reason: format!("TLS with the destination failed: {reason}"),
                source: None,
            },
            None => e,
        }
    }
}

impl Drop for SourceTunnel {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn client_side(plain: &UnixStream, dest: SocketAddr, config: Arc<ClientConfig>) -> io::Result<()> {
    let net = TcpStream::connect_timeout(&dest, HANDSHAKE_TIMEOUT)?;
    let _ = net.set_nodelay(true);
    let name = ServerName::from(dest.ip());
    let tls = ClientConnection::new(config, name).map_err(io::Error::other)?;
    pump(rustls::Connection::Client(tls), net, plain)
}

/// The destination's end: accepts TLS connections on `public`, checks the client's
/// certificate, and forwards each one to a private Unix endpoint the receiver listens on.
#[derive(Debug)]
pub struct DestTunnel {
    endpoint: Endpoint,
    stop: Arc<AtomicBool>,
    _dir: PrivateDir,
}

impl DestTunnel {
    /// Starts forwarding TLS connections from `public` to a listener in a private directory,
    /// returned for the receiver ([`crate::receive`] on it sees only peers whose
    /// certificate the CA signed).
    pub fn start(
        public: TcpListener,
        config: Arc<ServerConfig>,
    ) -> Result<(Self, crate::Listener), TlsError> {
        let dir = PrivateDir::new("dst").map_err(TlsError::Tunnel)?;
        let inner_path = dir.0.join("in.sock");
        let inner = Endpoint::Unix(inner_path.clone());
        let listener = crate::Listener::bind(&inner)
            .map_err(|e| TlsError::Tunnel(io::Error::other(crate::error::chain_text(&e))))?;
        public.set_nonblocking(true).map_err(TlsError::Tunnel)?;
        let stop = Arc::new(AtomicBool::new(false));
        let halt = Arc::clone(&stop);
        let busy = Arc::new(AtomicUsize::new(0));
        std::thread::spawn(move || {
            while !halt.load(Ordering::Relaxed) {
                match public.accept() {
                    Ok((net, peer)) => {
                        if busy.load(Ordering::SeqCst) >= MAX_HANDSHAKES {
                            warn!(%peer, "too many TLS handshakes at once: connection closed");
                            continue;
                        }
                        busy.fetch_add(1, Ordering::SeqCst);
                        let (config, path, busy) =
                            (Arc::clone(&config), inner_path.clone(), Arc::clone(&busy));
                        std::thread::spawn(move || server_side(net, peer, config, &path, &busy));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(_) => break,
                }
            }
        });
        Ok((
            Self {
                endpoint: inner,
                stop,
                _dir: dir,
            },
            listener,
        ))
    }

    /// The private endpoint the receiver listens on.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }
}

impl Drop for DestTunnel {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn server_side(
    mut net: TcpStream,
    peer: SocketAddr,
    config: Arc<ServerConfig>,
    inner: &Path,
    busy: &AtomicUsize,
) {
    let r = (|| -> io::Result<(ServerConnection, UnixStream)> {
        net.set_nonblocking(false)?;
        net.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        net.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
        let _ = net.set_nodelay(true);
        let mut tls = ServerConnection::new(config).map_err(io::Error::other)?;
        while tls.is_handshaking() {
            tls.complete_io(&mut net)?;
        }
        let plain = UnixStream::connect(inner)?;
        Ok((tls, plain))
    })();
    busy.fetch_sub(1, Ordering::SeqCst);
    match r {
        Ok((tls, plain)) => {
            info!(%peer, "TLS connection accepted (client certificate verified)");
            if let Err(e) = pump(rustls::Connection::Server(tls), net, &plain) {
                warn!(%peer, error = %e, "TLS connection ended with an error");
            }
        }
        Err(e) => warn!(%peer, error = %e, "refused a TLS connection; still waiting for a source"),
    }
}

/// Bytes waiting to be written, consumed from the front without moving the rest.
#[derive(Default)]
struct Pending {
    buf: Vec<u8>,
    at: usize,
}

impl Pending {
    fn len(&self) -> usize {
        self.buf.len() - self.at
    }
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn bytes(&self) -> &[u8] {
        &self.buf[self.at..]
    }
    fn consume(&mut self, n: usize) {
        self.at += n;
        if self.at == self.buf.len() {
            self.buf.clear();
            self.at = 0;
        }
    }
    fn extend(&mut self, b: &[u8]) {
        if self.at > 0 && self.at >= self.buf.len() / 2 {
            self.buf.drain(..self.at);
            self.at = 0;
        }
        self.buf.extend_from_slice(b);
    }
}

/// Clear text decrypted but not yet taken by our side, past which the tunnel stops reading
/// the network (the peer then waits on TCP's flow control, and our memory stays bounded).
const TO_PLAIN_CAP: usize = 4 << 20;
/// Send buffer asked for on the clear socket: a Unix stream's writer may queue only its send
/// buffer and hears "writable" again only when three quarters of it drained, so with the
/// default (about 200 KiB) the engine emptied it and waited for us every few dozen pages.
const PLAIN_SNDBUF: usize = 4 << 20;

/// Moves bytes both ways between the clear `plain` socket and the TLS connection on `net`
/// until both directions are closed; a TLS error (a refused certificate, an alert) ends it.
///
/// Each wake-up moves everything that can move: all the network has (up to
/// [`TO_PLAIN_CAP`] not yet delivered), all our side can take, all rustls has encrypted.
/// Reading only one TLS read (at most 16 KiB) per wake-up, and a default-sized clear
/// socket, made the tunnel 8-20 times slower than clear text.
fn pump(mut tls: rustls::Connection, net: TcpStream, plain: &UnixStream) -> io::Result<()> {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    net.set_nonblocking(true)?;
    plain.set_nonblocking(true)?;
    // Best effort: the kernel caps it (net.core.wmem_max).
    let _ = rustix::net::sockopt::set_socket_send_buffer_size(plain, PLAIN_SNDBUF);
    // Enough encrypted output in flight to keep a fast link busy.
    tls.set_buffer_limit(Some(4 << 20));
    let (mut net, mut plain) = (net, plain);
    let mut to_plain = Pending::default();
    // Clear text read from our side that rustls has not taken yet (its buffer was full).
    let mut to_net = Pending::default();
    let mut buf = vec![0u8; 256 * 1024];
    let (mut plain_eof, mut net_eof, mut close_sent, mut plain_shut) = (false, false, false, false);
    loop {
        // Whether anything moved this turn: only a turn that moved nothing may wait.
        let mut moved = false;
        // Network towards our side: every record that has arrived, while our side keeps up.
        // Clear text rustls already holds goes first (the handshake may have read some).
        let mut eof_read = false;
        while !net_eof {
            loop {
                match tls.reader().read(&mut buf) {
                    Ok(0) => {
                        net_eof = true;
                        moved = true;
                        break;
                    }
                    Ok(n) => {
                        to_plain.extend(&buf[..n]);
                        moved = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            // After the network's end the reader has had its last look (it fails on an end
            // without close_notify, a truncation).
            if eof_read {
                net_eof = true;
            }
            if net_eof || to_plain.len() >= TO_PLAIN_CAP {
                break;
            }
            match tls.read_tls(&mut net) {
                Ok(0) => {
                    eof_read = true;
                    moved = true;
                }
                Ok(_) => {
                    moved = true;
                    if let Err(e) = tls.process_new_packets() {
                        // Tell the peer why (the alert rustls queued), then give up.
                        let _ = tls.write_tls(&mut net);
                        return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        while !to_plain.is_empty() {
            match plain.write(to_plain.bytes()) {
                Ok(n) => {
                    to_plain.consume(n);
                    moved = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if net_eof && to_plain.is_empty() && !plain_shut {
            let _ = plain.shutdown(std::net::Shutdown::Write);
            plain_shut = true;
        }
        // Our side towards the network: read while rustls takes it all.
        while !tls.is_handshaking() {
            while !to_net.is_empty() {
                let n = tls.writer().write(to_net.bytes())?;
                if n == 0 {
                    break;
                }
                to_net.consume(n);
                moved = true;
            }
            if !to_net.is_empty() || plain_eof {
                break;
            }
            match plain.read(&mut buf) {
                Ok(0) => {
                    plain_eof = true;
                    moved = true;
                }
                Ok(n) => {
                    to_net.extend(&buf[..n]);
                    moved = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if plain_eof && to_net.is_empty() && !close_sent {
            tls.send_close_notify();
            close_sent = true;
        }
        while tls.wants_write() {
            match tls.write_tls(&mut net) {
                Ok(_) => moved = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if net_eof && close_sent && to_plain.is_empty() && !tls.wants_write() {
            return Ok(());
        }
        // Without this, a turn that ended with rustls's buffer drained to the network but
        // clear text still waiting for it (`to_net`) waited on nothing that could happen: the
        // poll below asks neither for our side (`to_net` is not empty) nor for the network's
        // room (rustls has nothing to write), so it slept its whole timeout, a second at a
        // time, while the engine was blocked writing to us: the TLS throughput stall.
        if moved {
            continue;
        }
        // Wait for whichever side can move.
        let want_net_in = !net_eof && to_plain.len() < TO_PLAIN_CAP;
        let want_plain_in = !plain_eof && to_net.is_empty() && !tls.is_handshaking();
        let flags = |read: bool, write: bool| {
            let mut f = PollFlags::empty();
            if read {
                f |= PollFlags::IN;
            }
            if write {
                f |= PollFlags::OUT;
            }
            f
        };
        let mut fds = [
            PollFd::new(&net, flags(want_net_in, tls.wants_write())),
            PollFd::new(&plain, flags(want_plain_in, !to_plain.is_empty())),
        ];
        let timeout = Timespec {
            tv_sec: 1,
            tv_nsec: 0,
        };
        match poll(&mut fds, Some(&timeout)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}
