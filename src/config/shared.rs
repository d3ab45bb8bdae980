//! [`Shared`]: one copy of a value that many routes (and their series)
//! hold.
//!
//! At 50,000 routes every per-route copy of a name, a tenant or the
//! inherited `allow` list is a heap block of its own; sharing them is a
//! pointer each. Owns the type only: which values are shared is decided
//! where routes are laid out ([`pack`](super::pack)).

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use serde::{Serialize, Serializer};

/// An immutable string or list behind a reference count: a route's name,
/// held by the route and by its series; a tenant or an `allow` list, held
/// once by every route that has it. Reads as a `str` or a slice, and
/// compares, hashes, prints and serializes as one.
#[derive(PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Shared<T: ?Sized>(Arc<T>);

impl<T: ?Sized> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Shared(Arc::clone(&self.0))
    }
}

impl<T: ?Sized> Deref for Shared<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: ?Sized> AsRef<T> for Shared<T> {
    fn as_ref(&self) -> &T {
        &self.0
    }
}

impl<T: ?Sized + fmt::Debug> fmt::Debug for Shared<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        (**self).fmt(f)
    }
}

impl<T: ?Sized + fmt::Display> fmt::Display for Shared<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        (**self).fmt(f)
    }
}

impl<T: ?Sized + Serialize> Serialize for Shared<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (**self).serialize(s)
    }
}

impl Shared<str> {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for Shared<str> {
    fn default() -> Self {
        Shared(Arc::from(""))
    }
}

impl Borrow<str> for Shared<str> {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Shared<str> {
    fn from(s: &str) -> Self {
        Shared(Arc::from(s))
    }
}

impl From<String> for Shared<str> {
    fn from(s: String) -> Self {
        Shared(Arc::from(s))
    }
}

impl PartialEq<str> for Shared<str> {
    fn eq(&self, other: &str) -> bool {
        *self.0 == *other
    }
}

impl PartialEq<&str> for Shared<str> {
    fn eq(&self, other: &&str) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<String> for Shared<str> {
    fn eq(&self, other: &String) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<Shared<str>> for str {
    fn eq(&self, other: &Shared<str>) -> bool {
        *self == *other.0
    }
}

impl PartialEq<Shared<str>> for &str {
    fn eq(&self, other: &Shared<str>) -> bool {
        **self == *other.0
    }
}

impl PartialEq<Shared<str>> for String {
    fn eq(&self, other: &Shared<str>) -> bool {
        **self == *other.0
    }
}

impl<T> Default for Shared<[T]> {
    fn default() -> Self {
        Shared(Arc::from(Vec::new()))
    }
}

impl<T> From<Vec<T>> for Shared<[T]> {
    fn from(v: Vec<T>) -> Self {
        Shared(Arc::from(v))
    }
}

impl<T: Clone> From<&[T]> for Shared<[T]> {
    fn from(v: &[T]) -> Self {
        Shared(Arc::from(v))
    }
}

impl<T> FromIterator<T> for Shared<[T]> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        Shared(iter.into_iter().collect())
    }
}

impl<T: PartialEq> PartialEq<Vec<T>> for Shared<[T]> {
    fn eq(&self, other: &Vec<T>) -> bool {
        *self.0 == **other
    }
}

impl<T: PartialEq> PartialEq<[T]> for Shared<[T]> {
    fn eq(&self, other: &[T]) -> bool {
        *self.0 == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_compares_and_serializes_as_its_value() {
        let a: Shared<str> = "route-1".into();
        let b = a.clone();
        assert!(Arc::ptr_eq(&a.0, &b.0), "a clone is the same copy");
        assert_eq!(a, "route-1");
        assert_eq!(a, String::from("route-1"));
        assert_eq!("route-1", a);
        assert_eq!(a.as_str(), "route-1");
        assert_eq!(format!("{a} {a:?}"), "route-1 \"route-1\"");
        assert_eq!(serde_json::to_string(&a).unwrap(), "\"route-1\"");
        let l: Shared<[u8]> = vec![1, 2].into();
        assert_eq!(l, vec![1, 2]);
        assert_eq!(serde_json::to_string(&l).unwrap(), "[1,2]");
        assert_eq!(format!("{l:?}"), "[1, 2]");
    }
}
