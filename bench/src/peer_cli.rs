//! The command line every peer server shares with `examples/echo`:
//! `NAME [ADDR] [echo|broadcast] [--max-message-size BYTES]`.

/// What the server does with each message.
#[derive(Clone, Copy, PartialEq)]
pub enum Mode {
    /// Back to its sender.
    Echo,
    /// To every client, the sender included.
    Broadcast,
}

fn usage(name: &str, why: &str) -> ! {
    eprintln!("{why}\nusage: {name} [ADDR] [echo|broadcast] [--max-message-size BYTES]");
    std::process::exit(2)
}

/// Parse the arguments: (address, mode, max message size). Exits with
/// status 2 and a usage line on bad input.
pub fn parse_args(name: &str, what: &str) -> (String, Mode, usize) {
    let (mut addr, mut mode, mut max) = ("127.0.0.1:13003".to_string(), Mode::Echo, 64 << 20);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "echo" => mode = Mode::Echo,
            "broadcast" => mode = Mode::Broadcast,
            "--max-message-size" => {
                let n = args.next().and_then(|v| v.parse().ok());
                max =
                    n.unwrap_or_else(|| usage(name, "--max-message-size needs a number of bytes"));
            }
            "-h" | "--help" => usage(name, what),
            a if a.starts_with('-') => usage(name, &format!("unknown option {a}")),
            a => addr = a.to_string(),
        }
    }
    (addr, mode, max)
}
