//! The command line of the examples that take nothing but an address.

/// The address given on the command line, or `default`; `None` once
/// `-h` or `--help` (anywhere) has printed the usage, made of `name`,
/// `about` and `default`. An option it does not know, or a second
/// argument, is an error, with the usage on stderr: taken as the
/// address, `--help` failed as one that does not resolve.
pub fn addr_or_help(
    name: &str,
    about: &str,
    default: &str,
) -> Result<Option<String>, enjent::Error> {
    let usage = format!("{about}\nusage: {name} [ADDR]    (default {default})");
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{usage}");
        return Ok(None);
    }
    let bad = |why: String| {
        eprintln!("{why}\n{usage}");
        enjent::Error::InvalidInput("bad arguments")
    };
    if let Some(a) = args.iter().find(|a| a.starts_with('-')) {
        return Err(bad(format!("unknown option {a}")));
    }
    match args.as_slice() {
        [] => Ok(Some(default.to_string())),
        [addr] => Ok(Some(addr.clone())),
        [_, extra, ..] => Err(bad(format!("unexpected argument {extra}"))),
    }
}
