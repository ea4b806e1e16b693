//! The subscription index: a trie over topic levels.
//!
//! Matching walks at most the levels of the topic plus the `+`/`#` branches, so
//! its cost grows with topic depth and the number of matches, not with the
//! number of filters.
//!
//! The tree is a persistent value: its maps are `imbl` hash array mapped tries,
//! so cloning it is O(1) and a change copies only the path it touches. The
//! broker publishes it as a read-mostly snapshot (`arc_swap`): publishers read
//! the current snapshot without taking any lock; SUBSCRIBE/UNSUBSCRIBE, one
//! at a time, clone it, change it and swap the new one in.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Topic levels are short strings hashed on every match: foldhash (the
/// hasher hashbrown uses) instead of SipHash. Keys come from clients, so it
/// is the randomly seeded variant.
type HashMap<K, V> =
    imbl::GenericHashMap<K, V, foldhash::fast::RandomState, imbl::shared_ptr::DefaultSharedPtr>;

use edgehub_codec::SubscriptionOptions;

/// What one session asked for with one filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubEntry {
    pub options: SubscriptionOptions,
    pub id: Option<u32>,
}

#[derive(Default, Clone)]
struct SharedGroup {
    members: Vec<(Arc<str>, SubEntry)>,
    /// Shared by every snapshot, so round robin continues across changes.
    next: Arc<AtomicUsize>,
}

#[derive(Default, Clone)]
struct Node {
    children: HashMap<Box<str>, Node>,
    direct: HashMap<Arc<str>, SubEntry>,
    shared: HashMap<Box<str>, SharedGroup>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.direct.is_empty() && self.shared.is_empty()
    }
}

/// A shared group that matched: the broker picks one member.
pub struct SharedMatch<'a> {
    pub members: &'a [(Arc<str>, SubEntry)],
    /// Round-robin start, advanced on every match.
    pub start: usize,
}

#[derive(Default, Clone)]
pub struct SubscriptionTree {
    root: Node,
    count: usize,
}

impl SubscriptionTree {
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn node_mut(&mut self, filter: &str) -> &mut Node {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        node
    }

    /// Adds or replaces; returns whether this session already had this filter.
    pub fn insert(
        &mut self,
        client: &Arc<str>,
        share: Option<&str>,
        filter: &str,
        entry: SubEntry,
    ) -> bool {
        let node = self.node_mut(filter);
        let existed = match share {
            None => node.direct.insert(client.clone(), entry).is_some(),
            Some(group) => {
                let g = node.shared.entry(group.into()).or_default();
                match g.members.iter_mut().find(|(c, _)| c == client) {
                    Some(m) => {
                        m.1 = entry;
                        true
                    }
                    None => {
                        g.members.push((client.clone(), entry));
                        false
                    }
                }
            }
        };
        if !existed {
            self.count += 1;
        }
        existed
    }

    /// Removes; returns whether it existed.
    pub fn remove(&mut self, client: &str, share: Option<&str>, filter: &str) -> bool {
        let levels: Vec<&str> = filter.split('/').collect();
        let removed = Self::remove_at(&mut self.root, &levels, client, share);
        if removed {
            self.count -= 1;
        }
        removed
    }

    fn remove_at(node: &mut Node, levels: &[&str], client: &str, share: Option<&str>) -> bool {
        let Some((first, rest)) = levels.split_first() else {
            return match share {
                None => node.direct.remove(client).is_some(),
                Some(group) => {
                    let Some(g) = node.shared.get_mut(group) else {
                        return false;
                    };
                    let before = g.members.len();
                    g.members.retain(|(c, _)| &**c != client);
                    let removed = g.members.len() != before;
                    if g.members.is_empty() {
                        node.shared.remove(group);
                    }
                    removed
                }
            };
        };
        let Some(child) = node.children.get_mut(*first) else {
            return false;
        };
        let removed = Self::remove_at(child, rest, client, share);
        if child.is_empty() {
            node.children.remove(*first);
        }
        removed
    }

    /// Calls `direct` for every plain subscription and `shared` for every shared
    /// group whose filter matches `topic`.
    pub fn for_each_match<'a>(
        &'a self,
        topic: &str,
        mut direct: impl FnMut(&'a Arc<str>, &'a SubEntry),
        mut shared: impl FnMut(SharedMatch<'a>),
    ) {
        let dollar = topic.starts_with('$');
        let mut visit = |node: &'a Node| {
            for (c, e) in node.direct.iter() {
                direct(c, e);
            }
            for g in node.shared.values() {
                shared(SharedMatch {
                    members: &g.members,
                    start: g.next.fetch_add(1, Ordering::Relaxed),
                });
            }
        };
        // Iterative walk: (node, level index) pairs still to expand.
        let levels: smallvec_levels::Levels = topic.split('/').collect();
        let mut stack: Vec<(&'a Node, usize)> = vec![(&self.root, 0)];
        while let Some((node, i)) = stack.pop() {
            let wild_ok = !(i == 0 && dollar);
            if wild_ok {
                if let Some(h) = node.children.get("#") {
                    visit(h);
                }
            }
            if i == levels.len() {
                visit(node);
                continue;
            }
            if wild_ok {
                if let Some(p) = node.children.get("+") {
                    stack.push((p, i + 1));
                }
            }
            if let Some(c) = node.children.get(levels[i]) {
                stack.push((c, i + 1));
            }
        }
    }
}

/// Topic levels without a heap allocation for the common depth.
mod smallvec_levels {
    pub struct Levels<'a> {
        inline: [&'a str; 16],
        len: usize,
        heap: Vec<&'a str>,
    }

    impl<'a> FromIterator<&'a str> for Levels<'a> {
        fn from_iter<I: IntoIterator<Item = &'a str>>(iter: I) -> Self {
            let mut l = Levels {
                inline: [""; 16],
                len: 0,
                heap: Vec::new(),
            };
            for s in iter {
                if l.len < 16 {
                    l.inline[l.len] = s;
                } else {
                    if l.heap.is_empty() {
                        l.heap.extend_from_slice(&l.inline);
                    }
                    l.heap.push(s);
                }
                l.len += 1;
            }
            l
        }
    }

    impl<'a> std::ops::Index<usize> for Levels<'a> {
        type Output = &'a str;
        fn index(&self, i: usize) -> &&'a str {
            if self.heap.is_empty() {
                &self.inline[..self.len][i]
            } else {
                &self.heap[i]
            }
        }
    }

    impl Levels<'_> {
        pub fn len(&self) -> usize {
            self.len
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgehub_codec::QoS;

    fn entry(q: QoS) -> SubEntry {
        SubEntry {
            options: SubscriptionOptions {
                qos: q,
                ..Default::default()
            },
            id: None,
        }
    }

    fn direct_matches(t: &SubscriptionTree, topic: &str) -> Vec<String> {
        let mut v = Vec::new();
        t.for_each_match(topic, |c, _| v.push(c.to_string()), |_| {});
        v.sort();
        v
    }

    #[test]
    fn wildcards_and_removal() {
        let mut t = SubscriptionTree::default();
        let a: Arc<str> = "a".into();
        let b: Arc<str> = "b".into();
        let c: Arc<str> = "c".into();
        assert!(!t.insert(&a, None, "x/+/z", entry(QoS::AtLeastOnce)));
        assert!(t.insert(&a, None, "x/+/z", entry(QoS::AtMostOnce)));
        t.insert(&b, None, "x/#", entry(QoS::AtMostOnce));
        t.insert(&c, None, "#", entry(QoS::AtMostOnce));
        assert_eq!(t.len(), 3);
        assert_eq!(direct_matches(&t, "x/y/z"), ["a", "b", "c"]);
        assert_eq!(direct_matches(&t, "x"), ["b", "c"]);
        assert_eq!(direct_matches(&t, "$x/y/z"), Vec::<String>::new());
        assert!(t.remove("a", None, "x/+/z"));
        assert!(!t.remove("a", None, "x/+/z"));
        assert_eq!(direct_matches(&t, "x/y/z"), ["b", "c"]);
        t.remove("b", None, "x/#");
        t.remove("c", None, "#");
        assert!(t.root.is_empty(), "empty nodes are pruned");
        assert!(t.is_empty());
    }

    #[test]
    fn deep_topics_and_shared_groups() {
        let mut t = SubscriptionTree::default();
        let a: Arc<str> = "a".into();
        let b: Arc<str> = "b".into();
        let deep = (0..40).map(|i| i.to_string()).collect::<Vec<_>>().join("/");
        t.insert(&a, None, &deep, entry(QoS::AtMostOnce));
        assert_eq!(direct_matches(&t, &deep), ["a"]);
        t.insert(&a, Some("g"), "s/+", entry(QoS::AtMostOnce));
        t.insert(&b, Some("g"), "s/+", entry(QoS::AtMostOnce));
        let mut groups = 0;
        t.for_each_match(
            "s/1",
            |_, _| panic!("no direct"),
            |g| {
                groups += 1;
                assert_eq!(g.members.len(), 2);
            },
        );
        assert_eq!(groups, 1);
        assert!(t.remove("a", Some("g"), "s/+"));
        assert!(t.remove("b", Some("g"), "s/+"));
    }
}
