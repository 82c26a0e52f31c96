//! The control socket's request parser on arbitrary input: `Request::parse` must answer every
//! line with a request or an error reply (never panic), and a command it accepts must encode
//! back into a request line that parses to the same command (the typed wire is lossless).
#![no_main]

use fastmig_host::command::Request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    match Request::parse(line) {
        Ok(req) => {
            let again = serde_json::to_string(&req.command).expect("a parsed command encodes");
            let back = Request::parse(&again).expect("an encoded command parses");
            assert_eq!(back.command, req.command, "{again}");
        }
        Err(reply) => {
            let _ = reply.to_line();
        }
    }
});
