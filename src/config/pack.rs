//! Moving the validated routes out of the parse tree's holes.
//!
//! The TOML parser frees its tree while serde fills [`raw`](super::raw),
//! and validation then allocates every [`Route`] in the holes it left, a
//! few small blocks per route spread over the whole tree's span. Once the
//! raw tree is dropped too, each page of that span still holds a route or
//! two, so the heap cannot give it back: at 50,000 routes, about 90 MiB of
//! free heap kept resident by 20 MiB of routes.
//!
//! [`relocate`] copies the routes into a few flat buffers (large blocks,
//! outside the holes), drops them, gives the free heap back, and builds
//! them again from the buffers. Nothing else of the load is alive by then,
//! so the routes, and what the node builds after them, are laid out one
//! after the other. Built again, routes share what they have in common
//! (see [`Shared`]): a tenant that is the route's name is the name, equal
//! tenants and equal `allow` lists (the inherited one) are one copy.
//!
//! Only the layout changes: the routes are equal to the ones given.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ipnet::IpNet;

use super::{Route, Shared, Target};

/// A range in one of [`Packed`]'s buffers.
type Span = Range<u32>;

/// A route whose strings and lists are spans of [`Packed`]'s buffers.
struct PackedRoute {
    name: Span,
    port: u16,
    via: Option<Span>,
    target: PackedTarget,
    tenant: Span,
    /// In [`Packed::nets`].
    allow: Span,
    /// In [`Packed::lists`], whose items are spans of the text.
    endpoints: Span,
    max_connections: u32,
    ssh_user: Option<Span>,
    not_before: Option<SystemTime>,
    not_after: Option<SystemTime>,
    max_session: Option<Duration>,
    /// In [`Packed::ips`].
    source: Span,
}

enum PackedTarget {
    Addr(SocketAddr),
    Name(Span, u16),
}

/// Every route, in a handful of allocations.
#[derive(Default)]
struct Packed {
    text: String,
    nets: Vec<IpNet>,
    ips: Vec<IpAddr>,
    lists: Vec<Span>,
    routes: Vec<PackedRoute>,
}

/// A buffer offset; configs are far below 4 GiB (files are at most 16 MiB).
fn offset(n: usize) -> u32 {
    u32::try_from(n).expect("a config's routes fit in 4 GiB")
}

fn range(r: &Span) -> Range<usize> {
    r.start as usize..r.end as usize
}

impl Packed {
    fn str(&mut self, s: &str) -> Span {
        let start = offset(self.text.len());
        self.text.push_str(s);
        start..offset(self.text.len())
    }

    fn pack(&mut self, r: &Route) -> PackedRoute {
        let start = offset(self.nets.len());
        self.nets.extend_from_slice(&r.allow);
        let allow = start..offset(self.nets.len());
        let mut endpoints = Vec::with_capacity(r.endpoints.len());
        for e in &r.endpoints {
            endpoints.push(self.str(e));
        }
        let start = offset(self.lists.len());
        self.lists.extend(endpoints);
        let endpoints = start..offset(self.lists.len());
        let start = offset(self.ips.len());
        self.ips.extend_from_slice(&r.source);
        let source = start..offset(self.ips.len());
        PackedRoute {
            name: self.str(&r.name),
            port: r.port,
            via: r.via.as_deref().map(|v| self.str(v)),
            target: match &r.target {
                Target::Addr(a) => PackedTarget::Addr(*a),
                Target::Name { host, port } => PackedTarget::Name(self.str(host), *port),
            },
            tenant: self.str(&r.tenant),
            allow,
            endpoints,
            max_connections: r.max_connections,
            ssh_user: r.ssh_user.as_deref().map(|u| self.str(u)),
            not_before: r.not_before,
            not_after: r.not_after,
            max_session: r.max_session,
            source,
        }
    }

    fn str_at(&self, s: &Span) -> &str {
        &self.text[range(s)]
    }

    fn string(&self, s: &Span) -> String {
        self.str_at(s).to_owned()
    }

    fn unpack<'a>(&'a self, p: &PackedRoute, common: &mut Common<'a>) -> Route {
        let name: Shared<str> = self.str_at(&p.name).into();
        let tenant = self.str_at(&p.tenant);
        let tenant = if tenant == &*name {
            name.clone()
        } else {
            common.tenants.entry(tenant).or_insert_with(|| tenant.into()).clone()
        };
        let allow = &self.nets[range(&p.allow)];
        let allow = common.allows.entry(allow).or_insert_with(|| allow.into()).clone();
        Route {
            name,
            port: p.port,
            via: p.via.as_ref().map(|v| self.string(v)),
            target: match &p.target {
                PackedTarget::Addr(a) => Target::Addr(*a),
                PackedTarget::Name(host, port) => Target::Name { host: self.string(host), port: *port },
            },
            tenant,
            allow,
            endpoints: self.lists[range(&p.endpoints)].iter().map(|e| self.string(e)).collect(),
            max_connections: p.max_connections,
            ssh_user: p.ssh_user.as_ref().map(|u| self.string(u)),
            not_before: p.not_before,
            not_after: p.not_after,
            max_session: p.max_session,
            source: self.ips[range(&p.source)].to_vec(),
        }
    }
}

/// The values routes share as they are built again, by value.
#[derive(Default)]
struct Common<'a> {
    tenants: HashMap<&'a str, Shared<str>>,
    allows: HashMap<&'a [IpNet], Shared<[IpNet]>>,
}

/// The same routes, in the same order, laid out afresh after the heap's
/// free pages are given back (see the module doc). Call once nothing else
/// of the load is alive.
pub(super) fn relocate(routes: Vec<Arc<Route>>) -> Vec<Arc<Route>> {
    let mut packed = Packed { routes: Vec::with_capacity(routes.len()), ..Packed::default() };
    for r in &routes {
        let p = packed.pack(r);
        packed.routes.push(p);
    }
    drop(routes);
    crate::sys::trim_heap();
    let mut common = Common::default();
    packed.routes.iter().map(|p| Arc::new(packed.unpack(p, &mut common))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::test_route;

    #[test]
    fn routes_come_back_equal() {
        let mut a = test_route("a", 8022, Some("vpce-1"), &["10.0.0.0/8", "::/0"], &["vpce-1", "vpce-2"]);
        a.target = Target::Name { host: "db.internal".into(), port: 5432 };
        a.tenant = "t".into();
        a.ssh_user = Some("ec2-user".into());
        a.not_before = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(5));
        a.not_after = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(9));
        a.max_session = Some(Duration::from_secs(60));
        a.max_connections = 3;
        a.source = vec!["10.0.5.10".parse().unwrap()];
        let b = test_route("b", 1, None, &["0.0.0.0/0"], &[]);
        let c = test_route("c", 2, None, &["0.0.0.0/0"], &[]);
        let routes = vec![Arc::new(a.clone()), Arc::new(b.clone()), Arc::new(c.clone())];
        let back = relocate(routes);
        assert_eq!(back.len(), 3);
        assert_eq!(*back[0], a);
        assert_eq!(*back[1], b);
        assert_eq!(*back[2], c);
        // Equal lists are one copy; a tenant that is the name is the name.
        assert!(std::ptr::eq(&*back[1].allow, &*back[2].allow));
        assert!(std::ptr::eq(&*back[1].tenant, &*back[1].name));
    }
}
