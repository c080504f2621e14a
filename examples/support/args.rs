//! The command line of the examples that take nothing but an address.

/// The address given on the command line, or `default`; `None` once
/// `-h` or `--help` (anywhere) has printed `usage`. An option it does
/// not know, or a second argument, is an error, with `usage` on stderr:
/// taken as the address, `--help` failed as one that does not resolve.
pub fn addr_or_help(usage: &str, default: &str) -> Result<Option<String>, enjent::Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{usage}");
        return Ok(None);
    }
    if let Some(a) = args.iter().find(|a| a.starts_with('-')) {
        return Err(bad(usage, &format!("unknown option {a}")));
    }
    match args.as_slice() {
        [] => Ok(Some(default.to_string())),
        [addr] => Ok(Some(addr.clone())),
        [_, extra, ..] => Err(bad(usage, &format!("unexpected argument {extra}"))),
    }
}

fn bad(usage: &str, why: &str) -> enjent::Error {
    eprintln!("{why}\n{usage}");
    enjent::Error::InvalidInput("bad arguments")
}
