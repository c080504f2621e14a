//! The upgrade request parser: any bytes give a request, "incomplete", or
//! an HTTP refusal that renders; never a panic.
#![no_main]

use enjent::proto::handshake::{accept_response, parse_request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match parse_request(data, 4096) {
        Ok(Some((req, n))) => {
            assert!(n <= data.len());
            let _ = (req.query_param("name"), req.cookie("session"), req.header("origin"));
            let resp = accept_response(req.key(), &[]);
            assert!(resp.starts_with(b"HTTP/1.1 101 "));
        }
        Ok(None) => assert!(data.len() < 4096),
        Err(reject) => {
            let resp = reject.to_response();
            assert!(resp.starts_with(b"HTTP/1.1 "));
        }
    }
});
