//! Test configs as values, rendered to TOML text: [`Config::loopback`] is
//! the shape most tests share (listen on 127.0.0.1, admit 127.0.0.0/8), and
//! a test adds its routes and the few keys it is about, so what differs
//! from the next test is all that it spells out.
//!
//! Only rendering lives here: no defaults of portgate's own are restated,
//! and a key a test does not set is not written.

use std::fmt;

/// A value as TOML writes it: strings (and addresses) quoted, numbers bare,
/// lists of strings.
pub trait Toml {
    fn toml(&self) -> String;
}

/// `s` as a TOML basic string: `"` and `\` escaped, newlines as `\n`, any
/// other control character as `\UXXXXXXXX`.
pub fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => out.push_str(&format!("\\U{:08x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

impl Toml for &str {
    fn toml(&self) -> String {
        toml_string(self)
    }
}

impl Toml for String {
    fn toml(&self) -> String {
        self.as_str().toml()
    }
}

impl Toml for std::net::SocketAddr {
    fn toml(&self) -> String {
        self.to_string().toml()
    }
}

impl Toml for &[&str] {
    fn toml(&self) -> String {
        let items: Vec<String> = self.iter().map(|s| s.toml()).collect();
        format!("[{}]", items.join(", "))
    }
}

impl<const N: usize> Toml for [&str; N] {
    fn toml(&self) -> String {
        self.as_slice().toml()
    }
}

macro_rules! bare {
    ($($t:ty),*) => {$(
        impl Toml for $t {
            fn toml(&self) -> String {
                self.to_string()
            }
        }
    )*};
}

bare!(i32, u16);

/// `key = value` lines in the order they were set; setting a key again
/// replaces its value in place.
#[derive(Clone, Default)]
struct Keys(Vec<(String, String)>);

impl Keys {
    fn set(&mut self, key: &str, value: String) {
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.0.push((key.to_string(), value)),
        }
    }

    fn write(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (k, v) in &self.0 {
            writeln!(f, "{k} = {v}")?;
        }
        Ok(())
    }
}

/// One `[[route]]`: name, port and target, and whatever else a test sets.
#[derive(Clone)]
pub struct Route(Keys);

impl Route {
    pub fn new(name: &str, port: u16, target: impl fmt::Display) -> Route {
        let mut keys = Keys::default();
        keys.set("name", name.toml());
        keys.set("port", port.toml());
        keys.set("target", target.to_string().toml());
        Route(keys)
    }

    /// Set `key` on this route, e.g. `.set("allow", ["127.0.0.3/32"])`.
    pub fn set(mut self, key: &str, value: impl Toml) -> Route {
        self.0.set(key, value.toml());
        self
    }
}

/// One `[[test]]`: port, client and expectation, and whatever else a test
/// sets (`endpoint`, `at`, `route`, `reason`).
#[derive(Clone)]
pub struct Test(Keys);

impl Test {
    /// `expect = "admit"` for `client` on `port`.
    pub fn admit(port: u16, client: &str) -> Test {
        Test::new(port, client, "admit")
    }

    /// `expect = "reject"` for `client` on `port`.
    pub fn reject(port: u16, client: &str) -> Test {
        Test::new(port, client, "reject")
    }

    fn new(port: u16, client: &str, expect: &str) -> Test {
        let mut keys = Keys::default();
        keys.set("port", port.toml());
        keys.set("client", client.toml());
        keys.set("expect", expect.toml());
        Test(keys)
    }

    /// Set `key` on this test, e.g. `.set("route", "web")`.
    pub fn set(mut self, key: &str, value: impl Toml) -> Test {
        self.0.set(key, value.toml());
        self
    }
}

impl fmt::Display for Test {
    /// The `[[test]]` table alone, e.g. for an included file.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "[[test]]")?;
        self.0.write(f)
    }
}

/// A whole config: tables in the order first set, then the routes, then
/// the tests.
#[derive(Clone, Default)]
pub struct Config {
    tables: Vec<(String, Keys)>,
    routes: Vec<Route>,
    tests: Vec<Test>,
}

impl Config {
    /// No table at all.
    pub fn empty() -> Config {
        Config::default()
    }

    /// `[listen] address` and `[access] allow`.
    pub fn listen(address: &str, allow: &[&str]) -> Config {
        Config::empty().set("listen", "address", address).allow(allow)
    }

    /// Listen on 127.0.0.1, admit 127.0.0.0/8.
    pub fn loopback() -> Config {
        Config::listen("127.0.0.1", &["127.0.0.0/8"])
    }

    /// Set `key` in `[table]`; a new table goes after the others.
    pub fn set(mut self, table: &str, key: &str, value: impl Toml) -> Config {
        let value = value.toml();
        match self.tables.iter_mut().find(|(t, _)| t == table) {
            Some((_, keys)) => keys.set(key, value),
            None => {
                let mut keys = Keys::default();
                keys.set(key, value);
                self.tables.push((table.to_string(), keys));
            }
        }
        self
    }

    /// `[access] allow`: the sources every route without its own rule admits.
    pub fn allow(self, cidrs: &[&str]) -> Config {
        self.set("access", "allow", cidrs)
    }

    /// `[proxy_protocol] mode = "required"` from the `trusted` peers.
    pub fn proxy_required(self, trusted: &[&str]) -> Config {
        self.set("proxy_protocol", "mode", "required").set("proxy_protocol", "trusted", trusted)
    }

    /// A route with only name, port and target.
    pub fn route(self, name: &str, port: u16, target: impl fmt::Display) -> Config {
        self.with(Route::new(name, port, target))
    }

    /// A route built with [`Route::set`] for its own keys.
    pub fn with(mut self, route: Route) -> Config {
        self.routes.push(route);
        self
    }

    /// A `[[test]]` table.
    pub fn test(mut self, test: Test) -> Config {
        self.tests.push(test);
        self
    }

    /// A top-level key, before every table (`include = [...]`).
    pub fn top(mut self, key: &str, value: impl Toml) -> Config {
        self.tables.insert(0, (String::new(), Keys::default()));
        self.tables[0].1.set(key, value.toml());
        self
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (table, keys) in &self.tables {
            if !table.is_empty() {
                writeln!(f, "[{table}]")?;
            }
            keys.write(f)?;
        }
        for Route(keys) in &self.routes {
            writeln!(f, "[[route]]")?;
            keys.write(f)?;
        }
        for test in &self.tests {
            write!(f, "{test}")?;
        }
        Ok(())
    }
}
