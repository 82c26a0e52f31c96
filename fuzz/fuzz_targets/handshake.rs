//! The destination's handshake and session on arbitrary bytes from one peer over loopback:
//! the destination must refuse (or, for a well-formed session, finish) without panicking, and
//! give up at its deadlines. It runs on the accepted connection (`receive_accepted`): the
//! accept loop in front of it, which turns away connections without a `Hello`, would make
//! every malformed input wait for the accept deadline.
#![no_main]

use std::io::Write;
use std::sync::OnceLock;
use std::time::Duration;

use fastmig_migration::test_utils::receive_accepted;
use fastmig_migration::test_utils::SoftVm;
use fastmig_migration::{Conn, Endpoint, IncomingVm, Listener, ReceiveOptions};
use libfuzzer_sys::fuzz_target;

struct Fixture {
    listener: Listener,
    at: Endpoint,
    vm: SoftVm,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let listener = Listener::bind(&"127.0.0.1:0".parse().expect("endpoint")).expect("bind");
        let at = listener.endpoint().expect("endpoint");
        let vm = SoftVm::new_incoming(1 << 20).expect("vm");
        Fixture { listener, at, vm }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    f.vm.set_paused(true);
    let opts = ReceiveOptions {
        accept_timeout: Some(Duration::from_millis(300)),
        io_timeout: Duration::from_millis(100),
        commit_timeout: Duration::from_millis(100),
        verify_memory: false,
    };
    let mut peer = Conn::connect(&f.at, Duration::from_secs(1)).expect("connect");
    let _ = peer.write_all(data);
    // Our half closed: the destination reads the input, then end of stream.
    if let Conn::Tcp(s) = &peer {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    let Ok(conn) = f.listener.accept(Some(Duration::from_secs(1))) else {
        return;
    };
    let _ = receive_accepted(conn, &f.listener, &opts, IncomingVm::Only(&f.vm));
    drop(peer);
});
