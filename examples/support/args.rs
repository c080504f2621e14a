//! The command line of the examples that take nothing but an address.

/// The address given on the command line, or `default`; `None` once
/// `-h` or `--help` has printed `usage`. An option it does not know, or
/// a second argument, is an error, with `usage` on stderr: taken as the
/// address, `--help` failed as an address that does not resolve.
pub fn addr_or_help(usage: &str, default: &str) -> Result<Option<String>, enjent::Error> {
    let mut args = std::env::args().skip(1);
    let addr = match args.next() {
        Some(a) if a == "-h" || a == "--help" => {
            println!("{usage}");
            return Ok(None);
        }
        Some(a) if a.starts_with('-') => return Err(bad(usage, &format!("unknown option {a}"))),
        Some(a) => a,
        None => default.to_string(),
    };
    match args.next() {
        Some(extra) => Err(bad(usage, &format!("unexpected argument {extra}"))),
        None => Ok(Some(addr)),
    }
}

fn bad(usage: &str, why: &str) -> enjent::Error {
    eprintln!("{why}\n{usage}");
    enjent::Error::InvalidInput("bad arguments")
}
