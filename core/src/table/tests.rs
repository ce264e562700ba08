//! Unit tests of the table, its in-place parse and the indexed [`super::View`]; `table()`
//! builds the small tables other modules' tests route over.

use super::*;
use crate::hint::parse_hint_list;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

/// A table of runners `127.0.0.1:1..`, each with the given hints, capacity 3,
/// max_concurrency 2, all available.
pub(crate) fn table(hints: &[&[&str]]) -> Table {
    Table {
        generation: 1,
        runners: hints
            .iter()
            .enumerate()
            .map(|(i, hs)| TableRunner {
                addr: format!("127.0.0.1:{}", i + 1),
                available: true,
                hints: hs.iter().map(|s| s.to_string()).collect(),
                capacity: 3,
                max_concurrency: 2,
                queue_token: 0,
                unreachable: false,
                warm: Vec::new(),
            })
            .collect(),
    }
}

#[test]
fn view_indexes_hints_and_addresses() {
    let v = View::from_table(&table(&[&["a", "b"], &["b"], &[]]));
    assert_eq!(v.holders("a"), &[0]);
    assert_eq!(v.holders("b"), &[0, 1]);
    assert!(v.holders("zz").is_empty());
    assert_eq!(v.index_of("127.0.0.1:3"), Some(2));
    assert_eq!(v.index_of("127.0.0.1:9"), None);
    assert_eq!(v.format_candidates(&[2, 0, 99]), "127.0.0.1:3,127.0.0.1:1");
    assert!(v.runner(2).unwrap().has_free_slot());
}

#[test]
fn set_runner_hints_reindexes() {
    let mut v = View::from_table(&table(&[&["a", "b"], &["b"]]));
    assert!(v.set_runner_hints(1, &parse_hint_list(b"b,x,y", 64, 8)));
    assert_eq!(v.slot_costs(), &[0, 1], "runner 1 is full now");
    assert!(v.set_runner_hints(1, &parse_hint_list(b"b", 64, 8)));
    assert!(v.set_runner_hints(0, &parse_hint_list(b"c", 64, 8)));
    assert!(v.holders("a").is_empty());
    assert_eq!(v.holders("b"), &[1]);
    assert_eq!(v.holders("c"), &[0]);
    assert_eq!(v.hint_count(), 2);
    assert!(!v.set_runner_hints(0, &parse_hint_list(b"c", 64, 8)));
    assert!(!v.set_runner_hints(7, &parse_hint_list(b"c", 64, 8)));
}

#[test]
fn holders_spill_past_three_and_shrink_back() {
    let hs: Vec<&[&str]> = vec![&["a"], &["a", "b"], &["a"], &["a"], &["a"]];
    let mut v = View::from_table(&table(&hs));
    assert_eq!(v.holders("a"), &[0, 1, 2, 3, 4]);
    for i in [4, 0, 2] {
        assert!(v.set_runner_hints(i, &parse_hint_list(b"", 64, 8)));
    }
    assert_eq!(v.holders("a"), &[1, 3]);
    assert!(v.set_runner_hints(1, &parse_hint_list(b"b", 64, 8)));
    assert!(v.set_runner_hints(3, &parse_hint_list(b"b,c", 64, 8)));
    assert!(v.holders("a").is_empty());
    assert_eq!(v.holders("b"), &[1, 3]);
    assert_eq!(v.hint_count(), 2);
    // Re-listing a hint moves the runner to the end, as before.
    let mut v = View::from_table(&table(&[&["a"], &["a"]]));
    assert!(v.set_runner_hints(0, &parse_hint_list(b"a,z", 64, 8)));
    assert_eq!(v.holders("a"), &[1, 0]);
}

#[test]
fn from_owned_matches_from_table() {
    let t = table(&[&["a", "b"], &["b"], &[]]);
    let (x, y) = (View::from_table(&t), View::from_owned(t));
    assert_eq!(x.runners(), y.runners());
    for h in ["a", "b", "c"] {
        assert_eq!(x.holders(h), y.holders(h));
    }
    assert_eq!(x.hint_count(), y.hint_count());
}

/// The fleet scan's lanes, as kept by `v`, and as its runners say they should be.
fn lanes_of_view(v: &View) -> [(Vec<u32>, Vec<u32>); 2] {
    let runners = v.runners();
    let gates = runners.iter().map(|r| if r.available { r.max_concurrency } else { 0 }).collect();
    let costs = runners.iter().map(crate::rank::slot_cost).collect();
    [(v.gates().to_vec(), v.slot_costs().to_vec()), (gates, costs)]
}

/// Holder lists as sets, for every hint of either view.
fn index_of_view(v: &View) -> Vec<(String, Vec<u32>)> {
    let mut hints: Vec<String> = v.runners().iter().flat_map(|r| r.hints.clone()).collect();
    hints.sort();
    hints.dedup();
    hints
        .into_iter()
        .map(|h| {
            let mut l = v.holders(&h).to_vec();
            l.sort();
            (h, l)
        })
        .collect()
}

#[test]
fn refresh_from_equals_a_rebuild() {
    let before = table(&[&["a", "b"], &["b", "c"], &["d"], &[]]);
    let mut after = table(&[&["b", "x"], &["b", "c"], &[], &["a", "d"]]);
    after.generation = 2;
    after.runners[1].available = false;
    after.runners[2].capacity = 9;
    after.runners[3].max_concurrency = 0;
    let mut v = View::from_table(&before);
    let bytes = after.encode();
    v.refresh_from_ref(TableRef::parse(&bytes).unwrap());
    let fresh = View::from_table(&after);
    assert_eq!(v.runners(), fresh.runners());
    assert_eq!(v.generation(), 2);
    assert_eq!(v.hint_count(), fresh.hint_count());
    assert_eq!(index_of_view(&v), index_of_view(&fresh));
    let [kept, wanted] = lanes_of_view(&v);
    assert_eq!(kept, wanted);
    assert!(v.holders("a") == [3] && v.holders("c") == [1] && v.holders("zz").is_empty());
    // A different runner list: rebuilt from scratch.
    let other = table(&[&["q"]]);
    let bytes = other.encode();
    v.refresh_from_ref(TableRef::parse(&bytes).unwrap());
    assert_eq!(v.runners(), View::from_table(&other).runners());
    assert_eq!(v.index_of("127.0.0.1:2"), None);
    assert_eq!(v.holders("q"), &[0]);
    assert!(v.holders("b").is_empty());
}

#[test]
fn table_ref_parses_what_encode_writes_and_refreshes_like_a_rebuild() {
    let mut t = table(&[&["a", "q\"uo\\te"], &["b"], &[]]);
    t.runners[1].available = false;
    let bytes = t.encode();
    let r = TableRef::parse(&bytes).unwrap();
    assert!(matches!(r.runners[0].hints[0].0, Cow::Borrowed(_)));
    assert!(matches!(r.runners[0].addr, Cow::Borrowed(_)));
    assert!(matches!(r.runners[0].hints[1].0, Cow::Owned(_)), "escaped: copied");
    assert_eq!(r.into_owned(), t);
    assert!(TableRef::parse(b"{garbage").is_none());
    assert!(
        TableRef::parse(br#"{"generation":1}"#).is_none() && Table::decode(br#"{"generation":1}"#).is_none()
    );

    let mut after = table(&[&["b", "x"], &["b"], &["a"]]);
    after.generation = 5;
    after.runners[0].capacity = 7;
    let mut v = View::from_table(&t);
    v.refresh_from_ref(TableRef::parse(&after.encode()).unwrap());
    let fresh = View::from_table(&after);
    assert_eq!(v.runners(), fresh.runners());
    assert_eq!(v.generation(), 5);
    assert_eq!(index_of_view(&v), index_of_view(&fresh));
    let [kept, wanted] = lanes_of_view(&v);
    assert_eq!(kept, wanted);
    assert_eq!(v.hint_count(), fresh.hint_count());
    // A different runner list: rebuilt.
    let other = table(&[&["z"]]);
    v.refresh_from_ref(TableRef::parse(&other.encode()).unwrap());
    assert_eq!(v.runners(), View::from_table(&other).runners());
    assert_eq!(v.holders("z"), &[0]);
}

#[test]
fn runner_hints_equal_iff_parsing_changes_nothing() {
    let v = View::from_table(&table(&[&["a", "bb"], &[]]));
    for (idx, raw, same) in [
        (0u32, &b"a,bb"[..], true),
        (0, b"a, bb", false),
        (0, b"a,bb,", false),
        (0, b"bb,a", false),
        (0, b"a", false),
        (0, b"a,b", false),
        (0, b"a,bbc", false),
        (0, b"", false),
        (1, b"", true),
        (1, b"a", false),
        (9, b"", false),
    ] {
        assert_eq!(v.runner_hints_equal(idx, raw, 64, 8), same, "{idx} {raw:?}");
        let changes = v.clone().set_runner_hints(idx, &parse_hint_list(raw, 64, 8));
        if same {
            assert!(!changes, "{idx} {raw:?}");
        }
    }
    // Caps the view's hints exceed: parse would differ, so not equal.
    assert!(!v.runner_hints_equal(0, b"a,bb", 64, 1));
    assert!(!v.runner_hints_equal(0, b"a,bb", 1, 8));
}

#[test]
fn table_and_queue_messages_round_trip() {
    let t = table(&[&["a"], &[]]);
    assert_eq!(Table::decode(&t.encode()), Some(t));
    assert_eq!(Table::decode(b"{garbage"), None);
    let m = encode_header_update("127.0.0.1:5", &["x".into(), "y".into()]);
    assert_eq!(decode_header_update(&m), Some(("127.0.0.1:5", &b"x,y"[..])));
    assert_eq!(decode_header_update(b"no-newline"), None);
    assert_eq!(decode_header_update(b"\xff\n"), None);
}

#[test]
fn warm_lists_are_indexed_kept_through_a_refresh_and_encoded_only_when_set() {
    let mut t = table(&[&["a"], &["b"]]);
    assert!(!String::from_utf8(t.encode()).unwrap().contains("warm"), "absent when empty");
    t.runners[0].warm = vec!["w".into(), "v".into()];
    let bytes = t.encode();
    assert_eq!(Table::decode(&bytes).unwrap(), t);
    assert_eq!(TableRef::parse(&bytes).unwrap().into_owned(), t);
    let mut v = View::from_table(&t);
    assert_eq!(
        (v.warm_holders("w"), v.warm_holders("v"), v.warm_holders("a")),
        (&[0][..], &[0][..], &[][..])
    );
    // A refresh in place moves the warm index with the reports.
    t.runners[0].warm = vec!["v".into()];
    t.runners[1].warm = vec!["w".into(), "v".into()];
    v.refresh_from_ref(TableRef::parse(&t.encode()).unwrap());
    assert_eq!((v.warm_holders("w"), v.warm_holders("v")), (&[1][..], &[0, 1][..]));
    assert_eq!(v.runner(1).unwrap().warm, vec!["w", "v"]);
    t.runners[0].warm.clear();
    t.runners[1].warm.clear();
    v.refresh_from_ref(TableRef::parse(&t.encode()).unwrap());
    assert!(v.warm_holders("w").is_empty() && v.warm_holders("v").is_empty());
    // Hints are untouched by all of it.
    assert_eq!((v.holders("a"), v.holders("b")), (&[0][..], &[1][..]));
}
