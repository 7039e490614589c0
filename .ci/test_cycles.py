#!/usr/bin/env python3
"""Tests of .ci/cycles.py on tiny crates written to a temporary folder: crates with cycles of each
form the check must find, between files and between top-level modules, and crates that only
look like they have some."""

import io
import os
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cycles  # noqa: E402


def crate(files):
    """Writes `files` ({path: text}) under a new folder; returns the path of its `src/lib.rs`."""
    root = tempfile.mkdtemp()
    for path, text in files.items():
        full = os.path.join(root, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w", encoding="utf-8") as f:
            f.write(text)
    return os.path.join(root, "src", "lib.rs")


def found(lib):
    """The cycles found, each as the set of its files relative to `src/`."""
    src = os.path.dirname(lib)
    result, errors = cycles.find_cycles([lib])
    assert not errors, errors
    return sorted(sorted(os.path.relpath(f, src) for f in cycle[:-1]) for cycle, _, _ in result)


def found_modules(lib):
    """The cycles found between top-level modules, each as the sorted names of its modules."""
    result, errors = cycles.find_module_cycles([lib])
    assert not errors, errors
    return sorted(sorted(cycle[:-1]) for cycle, _, _ in result)


class Cycles(unittest.TestCase):
    def test_a_crate_path_in_an_expression_closes_a_cycle(self):
        lib = crate({
            "src/lib.rs": "pub mod a;\npub mod b;\n",
            "src/a.rs": "use crate::b::B;\npub struct A;\n",
            "src/b.rs": "pub struct B;\nfn f() { let _ = crate::a::A; }\n",
        })
        self.assertEqual(found(lib), [["a.rs", "b.rs"]])

    def test_a_grouped_use_closes_a_cycle_through_a_third_file(self):
        lib = crate({
            "src/lib.rs": "pub mod a;\npub mod b;\npub mod c;\n",
            "src/a.rs": "use crate::{b::{self, B}, x::Y};\n",
            "src/b.rs": "pub struct B;\nuse super::c::{C as Renamed};\n",
            "src/c.rs": "pub struct C;\nimpl C { fn f() -> crate::a::A { todo!() } }\n",
        })
        self.assertEqual(found(lib), [["a.rs", "b.rs", "c.rs"]])

    def test_a_cycle_through_a_parent_and_out_of_its_part_is_found(self):
        lib = crate({
            "src/lib.rs": "pub mod store;\npub mod sent;\n",
            "src/store/mod.rs": "mod writer;\npub struct Row;\nfn f() { writer::run(); }\n",
            "src/store/writer.rs": "pub fn run() { let _ = crate::sent::MAX; }\n",
            "src/sent.rs": "pub const MAX: usize = 1;\nuse crate::store::Row;\n",
        })
        self.assertEqual(found(lib), [["sent.rs", "store/mod.rs", "store/writer.rs"]])

    def test_siblings_that_use_each_other_are_a_cycle(self):
        lib = crate({
            "src/lib.rs": "pub mod http;\n",
            "src/http/mod.rs": "pub mod kube;\npub mod write;\n",
            "src/http/kube.rs": "use super::write;\nfn routes() { write::create() }\n",
            "src/http/write.rs": "pub fn create() {}\nuse super::kube::Target;\n",
        })
        self.assertEqual(found(lib), [["http/kube.rs", "http/write.rs"]])

    def test_a_reexport_in_the_parent_is_followed_to_where_the_item_comes_from(self):
        lib = crate({
            "src/lib.rs": "pub mod store;\n",
            "src/store/mod.rs": "mod replace;\nmod writer;\npub use replace::Replaced;\n",
            "src/store/writer.rs": "use super::Replaced;\npub fn apply() {}\n",
            "src/store/replace.rs": "pub struct Replaced;\nfn f() { super::writer::apply() }\n",
        })
        self.assertEqual(found(lib), [["store/replace.rs", "store/writer.rs"]])

    def test_a_child_module_in_scope_and_a_self_path_count(self):
        lib = crate({
            "src/lib.rs": "pub mod a;\npub mod b;\n",
            "src/a/mod.rs": "pub mod inner;\n",
            "src/a/inner.rs": "pub fn f() { crate::b::g() }\n",
            "src/b.rs": "pub fn g() { self::h() }\nfn h() { use crate::a; a::inner::f() }\n",
        })
        self.assertEqual(found(lib), [["a/inner.rs", "b.rs"]])

    def test_a_test_module_closes_a_cycle_too(self):
        lib = crate({
            "src/lib.rs": "pub mod a;\npub mod b;\n",
            "src/a.rs": "pub fn f() { crate::b::g() }\n",
            "src/b.rs": "pub fn g() {}\n#[cfg(test)]\nmod tests {\n    use super::*;\n"
                        "    use crate::a::f;\n    #[test] fn t() { f(); g() }\n}\n",
        })
        self.assertEqual(found(lib), [["a.rs", "b.rs"]])

    def test_the_report_names_the_lines_that_close_the_cycle(self):
        lib = crate({
            "src/lib.rs": "pub mod a;\npub mod b;\n",
            "src/a.rs": "\nuse crate::b::B;\n",
            "src/b.rs": "pub struct B;\n\n\nfn f() { crate::a::g() }\n",
        })
        result, _ = cycles.find_cycles([lib])
        out = io.StringIO()
        cycles.report(result, out)
        text = out.getvalue()
        self.assertIn("a.rs:2: crate::b::B", text)
        self.assertIn("b.rs:4: crate::a::g", text)


class ModuleCycles(unittest.TestCase):
    # `a` is a folder; `b` is a `b.rs` with its `b/` children: each is one node.
    TWO_WAY = {
        "src/lib.rs": "pub mod a;\npub mod b;\n",
        "src/a/mod.rs": "pub mod x;\npub mod y;\n",
        "src/a/x.rs": "use crate::b::p::P;\npub fn f(_: P) {}\n",
        "src/a/y.rs": "pub struct Y;\n",
        "src/b.rs": "pub mod p;\npub mod q;\n",
        "src/b/p.rs": "pub struct P;\n",
        "src/b/q.rs": "\n\nfn g() { let _ = crate::a::y::Y; }\n",
    }

    def test_a_module_cycle_with_no_file_cycle_is_found(self):
        lib = crate(self.TWO_WAY)
        self.assertEqual(found(lib), [], "no file uses a file that uses it")
        self.assertEqual(found_modules(lib), [["a", "b"]])

    def test_the_report_names_the_modules_and_a_line_of_each_step(self):
        result, _ = cycles.find_module_cycles([crate(self.TWO_WAY)])
        out = io.StringIO()
        cycles.report_modules(result, out)
        text = out.getvalue()
        self.assertIn("module cycle: a -> b -> a", text)
        self.assertIn("a -> b: ", text)
        self.assertIn("a/x.rs:1: crate::b::p::P", text)
        self.assertIn("b/q.rs:3: crate::a::y::Y", text)

    def test_a_cycle_through_three_modules_and_a_reexport_is_found(self):
        lib = crate({
            "src/lib.rs": "pub mod a;\npub mod b;\npub mod c;\n",
            "src/a/mod.rs": "pub mod leaf;\nmod uses_b;\n",
            "src/a/leaf.rs": "pub struct Leaf;\n",
            "src/a/uses_b.rs": "use crate::b::B;\n",
            "src/b/mod.rs": "mod inner;\npub use inner::B;\n",
            "src/b/inner.rs": "pub struct B;\nfn f() { crate::c::g() }\n",
            # Test code counts here too.
            "src/c.rs": "pub fn g() {}\n#[cfg(test)]\nmod tests { use crate::a::leaf::Leaf; }\n",
        })
        self.assertEqual(found(lib), [])
        self.assertEqual(found_modules(lib), [["a", "b", "c"]])

    def test_the_command_exits_1_on_a_module_cycle_alone(self):
        lib = crate(self.TWO_WAY)
        out = io.StringIO()
        saved, sys.stdout = sys.stdout, out
        try:
            self.assertEqual(cycles.main([lib]), 1)
            self.assertEqual(cycles.main(["--report-only", lib]), 0)
        finally:
            sys.stdout = saved
        self.assertIn("no import cycles", out.getvalue())
        self.assertIn("module cycle: a -> b -> a", out.getvalue())


class NoModuleCycles(unittest.TestCase):
    def test_modules_used_one_way_and_the_crate_root_are_no_cycle(self):
        lib = crate({
            # The root uses every module and they use what it holds: the root is no node.
            "src/lib.rs": (
                "pub mod app;\npub mod low;\npub mod part;\npub use low::Low;\n"
                "pub const NAME: &str = \"x\";\n"
                "mod inline { use crate::app::run; }\n"
                "#[cfg(test)]\nmod tests { use crate::{app, part}; }\n"
            ),
            "src/low.rs": "pub struct Low;\nfn f() -> &'static str { crate::NAME }\n",
            # Within a module, files may use each other in both directions' modules' terms.
            "src/part/mod.rs": "pub mod one;\npub mod two;\nuse crate::Low;\n",
            "src/part/one.rs": "use super::two::Two;\nuse crate::low::Low;\n",
            "src/part/two.rs": "pub struct Two;\nfn f() { crate::part::g() }\n",
            "src/app.rs": "use crate::part::one;\npub fn run() { let _ = crate::Low; }\n",
        })
        self.assertEqual(found(lib), [])
        self.assertEqual(found_modules(lib), [])

    def test_the_command_exits_0_without_cycles_of_either_kind(self):
        lib = crate({
            "src/lib.rs": "pub mod a;\npub mod b;\n",
            "src/a.rs": "pub struct A;\n",
            "src/b/mod.rs": "mod c;\n",
            "src/b/c.rs": "use crate::a::A;\n",
        })
        out = io.StringIO()
        saved, sys.stdout = sys.stdout, out
        try:
            self.assertEqual(cycles.main([lib]), 0)
        finally:
            sys.stdout = saved
        self.assertIn("no cycles between top-level modules", out.getvalue())


class NoCycles(unittest.TestCase):
    def test_what_only_looks_like_a_cycle_is_none(self):
        lib = crate({
            "src/lib.rs": "//! See [`crate::b`].\npub mod a;\npub mod b;\npub mod p;\npub mod watch;\n",
            # Comments, doc links, strings, chars and raw strings name no module.
            "src/a.rs": (
                "/// Uses [`crate::b::B`] /* crate::b */\n"
                "/* nested /* crate::b::B */ still a comment crate::b */\n"
                "pub fn f() -> &'static str { let _c = '\"'; \"crate::b::B\" }\n"
                "pub fn g() -> &'static str { r#\"crate::b \"quoted\" \"# }\n"
                "use tokio::sync::watch;\n"
                "fn w(_: watch::Receiver<()>) {}\n"
            ),
            # Another crate's module of the same name as one of this crate's is not it.
            "src/b.rs": "use crate::a::f;\npub struct B;\nfn g() { f(); std::mem::drop(1); }\n",
            "src/watch.rs": "use crate::b::B;\n",
            # A visibility names where an item may be used, not a dependency.
            "src/p/mod.rs": "pub mod q;\npub(crate) fn f() { q::g() }\n",
            "src/p/q.rs": "pub(in crate::p) fn g() {}\n",
        })
        self.assertEqual(found(lib), [])

    def test_a_child_that_uses_its_parent_which_uses_it_is_no_cycle(self):
        lib = crate({
            "src/lib.rs": "pub mod store;\n",
            "src/store/mod.rs": "mod writer;\npub struct Change;\nfn f() { writer::run(); }\n",
            "src/store/writer.rs": "use super::Change;\npub fn run() { crate::store::f() }\n",
        })
        self.assertEqual(found(lib), [])

    def test_a_parent_that_only_declares_and_reexports_is_no_cycle(self):
        lib = crate({
            "src/lib.rs": "pub mod cloud;\n",
            "src/cloud/mod.rs": "pub mod state;\npub mod outbox;\npub use state::State;\n",
            "src/cloud/state.rs": "pub struct State;\n",
            "src/cloud/outbox.rs": "use super::state::State;\nfn f(_: State) {}\n",
        })
        self.assertEqual(found(lib), [])

    def test_the_command_exits_1_on_a_cycle_and_0_without(self):
        with_cycle = crate({
            "src/lib.rs": "pub mod a;\npub mod b;\n",
            "src/a.rs": "use crate::b::B;\npub struct A;\n",
            "src/b.rs": "use crate::a::A;\npub struct B;\n",
        })
        without = crate({"src/lib.rs": "pub mod a;\n", "src/a.rs": "pub struct A;\n"})
        quiet = io.StringIO()
        saved, sys.stdout = sys.stdout, quiet
        try:
            self.assertEqual(cycles.main([with_cycle]), 1)
            self.assertEqual(cycles.main(["--report-only", with_cycle]), 0)
            self.assertEqual(cycles.main([without]), 0)
        finally:
            sys.stdout = saved


if __name__ == "__main__":
    unittest.main()
