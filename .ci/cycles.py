#!/usr/bin/env python3
"""Finds import cycles between the source files of a Rust crate, and between its top-level
modules; exits 1 when there is one.

Usage: python3 .ci/cycles.py [--report-only] [CRATE_ROOT_FILE ...]   (default: src/lib.rs)

What counts as a file depending on another (the rule the CI check holds the code to):

- The unit is the file. An inline module (`mod tests { ... }`) belongs to its file, and so do
  the imports and paths inside it, test code included: a cycle that only tests close is still
  a cycle.
- A file depends on the file of every module it names: in `use` declarations, grouped ones
  (`use a::{b, c::d}`) expanded, and in paths anywhere in the code (`crate::a::f()`,
  `super::T`, `self::m::X`, and paths that start with a module in scope, such as a child
  module or a module brought in by `use`). A path names the deepest module it reaches: in
  `crate::store::read::get` that is `store/read.rs`, not `store/mod.rs`, which the path only
  passes through. An item a module imports is followed to where it comes from: through the
  re-export `pub use replace::Replaced` in `store/mod.rs`, `super::Replaced` names
  `store/replace.rs`.
- A parent module file (`mod.rs`, or `lib.rs` for the crate) and its children: the parent
  depends on a child where it uses the child's items (`writer::prepare()`, `pub use
  feed::Resume`); declaring it (`mod writer;`) is no dependency. A child's use of what its
  ancestors' files hold (`super::Change`, `crate::store::Store` from inside `store/`, the
  test harness inline in `ops/mod.rs` from `ops/patch.rs`) is not counted. As Rust's
  privacy lets a module see its ancestors' private items, a folder is one part: its
  `mod.rs` is the part's face and shared core, which the children build on and which
  assembles them (the `mqtt` backends build the `Link` that `mqtt/mod.rs` defines and
  starts them for). Every other use counts: between siblings (`http/kube.rs` and
  `http/write.rs`), between parts, and from a parent into its children, so a cycle through
  a part's `mod.rs` and out of the part (`sent_patches.rs` -> `store/mod.rs` ->
  `store/writer.rs` -> `sent_patches.rs`) is found.
- Comments, doc comments and string literals are not code: a doc link to `crate::x` is no
  dependency. Paths into other crates (`std::`, `tokio::`) are ignored.

Between top-level modules, a second check with the same uses: each module the crate root
declares is one node, with everything below it (a folder, or a `foo.rs` with its `foo/`
children, and the inline modules in its files); the crate root's own file (`lib.rs`,
`main.rs`, with the modules written inline in it) is no node. A module depends on another where
one of its files uses what the other holds, so `a -> b -> a` is a cycle even when no file of
it is: `a/x.rs` uses `b/p.rs` and `b/q.rs` uses `a/y.rs`. The parts then cannot be read, tested
or changed one below the other; what both sides need goes down into a module of its own, and
what reads from both goes up, beside what assembles them. The report names the modules and,
for each step, one line that takes it.

Not seen: what is reached with no path naming its module: a macro, a trait method, or a
method from an `impl` block in another file (`self.apply_replace()` in `store/writer` runs
code of `store/writer/replace.rs`). Such a block belongs in a child of the type's file. The check reads tokens, not a full Rust grammar; `pub(in path)` is skipped.
"""

import argparse
import os
import sys
from collections import defaultdict

# ---------------------------------------------------------------- tokens


def tokenize(text):
    """(kind, value, line) tokens: 'id' identifiers (`$crate` too), 'p' punctuation (`::` as one
    token). Comments, strings, chars and lifetimes are dropped."""
    tokens = []
    i, n, line = 0, len(text), 1
    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
            i += 1
        elif c.isspace():
            i += 1
        elif text.startswith("//", i):
            while i < n and text[i] != "\n":
                i += 1
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    line += text[i] == "\n"
                    i += 1
        elif c == '"' or (c in "bc" and text.startswith('"', i + 1)):
            i, line = skip_string(text, i + (c != '"'), line)
        elif c in "bcr" and raw_string_at(text, i):
            i, line = skip_raw_string(text, i, line)
        elif c == "'":
            i = skip_char_or_lifetime(text, i)
        elif c.isalpha() or c == "_" or (c == "$" and text.startswith("$crate", i)):
            start = i
            i += 1
            while i < n and (text[i].isalnum() or text[i] == "_"):
                i += 1
            word = text[start:i]
            if word == "r" and text.startswith("#", i) and i + 1 < n and is_ident_start(text[i + 1]):
                continue  # a raw identifier: the name follows
            tokens.append(("id", word, line))
        elif text.startswith("::", i):
            tokens.append(("p", "::", line))
            i += 2
        else:
            tokens.append(("p", c, line))
            i += 1
    return tokens


def is_ident_start(c):
    return c.isalpha() or c == "_"


def raw_string_at(text, i):
    """Whether a raw string (`r"`, `r#"`, `br#"`, `cr"`) starts at `i`."""
    j = i + (text[i] in "bc")
    if not text.startswith("r", j):
        return False
    j += 1
    while j < len(text) and text[j] == "#":
        j += 1
    return j < len(text) and text[j] == '"'


def skip_string(text, i, line):
    """Past the string whose opening quote is at `i`."""
    i += 1
    while i < len(text) and text[i] != '"':
        if text[i] == "\\":
            i += 1
        line += text[i] == "\n" if i < len(text) else 0
        i += 1
    return i + 1, line


def skip_raw_string(text, i, line):
    while text[i] != "r":
        i += 1
    i += 1
    hashes = 0
    while text[i] == "#":
        hashes, i = hashes + 1, i + 1
    end = '"' + "#" * hashes
    close = text.find(end, i + 1)
    close = len(text) if close < 0 else close
    return close + len(end), line + text.count("\n", i, close)


def skip_char_or_lifetime(text, i):
    if text.startswith("\\", i + 1):  # an escaped char: '\n', '\'', '\u{1F600}'
        close = text.find("'", i + 3)
        return len(text) if close < 0 else close + 1
    if i + 2 < len(text) and text[i + 2] == "'":  # 'a'
        return i + 3
    return i + 1  # a lifetime or label: its name is read as an identifier, harmlessly


# ---------------------------------------------------------------- modules


class Module:
    """A module: a file of its own, or inline in its parent's file."""

    def __init__(self, name, parent, file, child_dir):
        self.name, self.parent, self.file = name, parent, file
        self.child_dir = child_dir  # where `mod x;` declared here finds x's file
        self.children = {}
        self.imports = {}  # name -> list of segments as written, resolved later
        self.globs = []  # use paths ending in `*`

    def path(self):
        names, m = [], self
        while m.parent is not None:
            names.append(m.name)
            m = m.parent
        return "crate" + "".join("::" + n for n in reversed(names))


class Crate:
    def __init__(self, root_file):
        self.root = Module("crate", None, root_file, os.path.dirname(root_file))
        self.uses = []  # (module, segments, line): every path and use to resolve
        self.errors = []
        self.following = set()  # re-exports being followed, against a loop of them
        self.load(self.root, root_file)

    def load(self, module, file):
        with open(file, encoding="utf-8") as f:
            tokens = tokenize(f.read())
        self.scan(module, tokens)

    def child_file(self, module, name):
        for candidate in (
            os.path.join(module.child_dir, name + ".rs"),
            os.path.join(module.child_dir, name, "mod.rs"),
        ):
            if os.path.isfile(candidate):
                return candidate
        return None

    def scan(self, file_module, tokens):
        """Declarations, `use` trees and paths of one file; inline modules followed by braces."""
        scopes = [(file_module, 0)]  # (module, brace depth its body closes at)
        depth, i, n = 0, 0, len(tokens)
        while i < n:
            kind, value, line = tokens[i]
            module = scopes[-1][0]
            if (kind, value) == ("p", "{"):
                depth += 1
            elif (kind, value) == ("p", "}"):
                if depth == scopes[-1][1] and len(scopes) > 1:
                    scopes.pop()
                depth -= 1
            elif (kind, value) == ("id", "mod") and i + 2 < n and tokens[i + 1][0] == "id":
                name, after = tokens[i + 1][1], tokens[i + 2][1]
                if after == ";":
                    self.declare_file(module, name, line)
                elif after == "{":
                    child = Module(name, module, module.file, os.path.join(module.child_dir, name))
                    module.children[name] = child
                    depth += 1
                    scopes.append((child, depth))
                i += 3
                continue
            elif (kind, value) == ("id", "use"):
                i = self.read_use(module, tokens, i + 1)
                continue
            elif (kind, value) == ("id", "pub") and i + 2 < n and tokens[i + 2][1] == "in":
                while i < n and tokens[i][1] != ")":  # `pub(in crate::a)` names no dependency
                    i += 1
            elif kind == "id" and self.path_start(tokens, i):
                segments, i = read_path(tokens, i)
                self.uses.append((module, segments, line))
                continue
            i += 1

    @staticmethod
    def path_start(tokens, i):
        follows = i + 1 < len(tokens) and tokens[i + 1][1] == "::"
        continues = i > 0 and tokens[i - 1][1] == "::"
        return follows and not continues

    def declare_file(self, module, name, line):
        file = self.child_file(module, name)
        if file is None:
            self.errors.append(f"{module.file}:{line}: no file for `mod {name};`")
            return
        if file.endswith("mod.rs"):
            child_dir = os.path.dirname(file)
        else:
            child_dir = os.path.join(module.child_dir, name)
        child = Module(name, module, file, child_dir)
        module.children[name] = child
        self.load(child, file)

    def read_use(self, module, tokens, i):
        """Expands the `use` tree from `i` into its paths; returns the index after the `;`."""
        line = tokens[i][2] if i < len(tokens) else 0
        paths, i = use_tree(tokens, i, [])
        for segments, alias in paths:
            if segments and segments[-1] == "*":
                module.globs.append(segments[:-1])
                self.uses.append((module, segments[:-1], line))
                continue
            if segments and segments[-1] == "self":
                segments = segments[:-1]
            if segments:
                module.imports[alias or segments[-1]] = segments
                self.uses.append((module, segments, line))
        while i < len(tokens) and tokens[i][1] != ";":
            i += 1
        return i + 1

    # ------------------------------------------------------------ resolving

    def lookup(self, module, name, seen=None):
        """The module `name` is in `module`'s scope, or None (another crate, or no module)."""
        seen = seen or set()
        if id(module) in seen:
            return None
        seen.add(id(module))
        if name in module.imports:
            # Only an import of a module itself brings a module name; `use a::Item` does not.
            return self.resolve(module, module.imports[name], seen, whole=True)
        if name in module.children:
            return module.children[name]
        for glob in module.globs:
            target = self.resolve(module, glob, seen, whole=True)
            if target is not None:
                found = self.lookup(target, name, seen)
                if found is not None:
                    return found
        return None

    def resolve(self, module, segments, seen=None, whole=False):
        """The deepest module `segments` (a path used in `module`) names, or None; with `whole`,
        only a module the path names entirely."""
        if not segments:
            return None
        first, rest = segments[0], segments[1:]
        if first in ("crate", "$crate"):
            at = self.root
        elif first == "self":
            at = module
        elif first == "super":
            at = module.parent
            while rest and rest[0] == "super" and at is not None:
                at, rest = at.parent, rest[1:]
        else:
            at = self.lookup(module, first, seen)
        if at is None:
            return None
        for i, name in enumerate(rest):
            if name in at.children:
                at = at.children[name]
                continue
            if whole:
                return None
            # An item the module imports (a `pub use` re-export, say) comes from elsewhere.
            if name in at.imports and (id(at), name) not in self.following:
                self.following.add((id(at), name))
                try:
                    origin = self.resolve(at, at.imports[name] + rest[i + 1:])
                finally:
                    self.following.discard((id(at), name))
                return origin if origin is not None else at
            return at
        return at

    def edges(self):
        """{(from file, to file): [(line, path as written)]}; a file's edges to itself and to
        its ancestors' files are left out."""
        found = defaultdict(list)
        for module, segments, line in self.uses:
            target = self.resolve(module, segments)
            if target is None or target.file in ancestor_files(module):
                continue
            found[(module.file, target.file)].append((line, "::".join(segments)))
        return found

    def module_edges(self):
        """{(from module, to module): [(file, line, path as written)]} between the top-level
        modules, by name; the crate root's own file, and what is written inline in it, is no
        module here."""
        found = defaultdict(list)
        for module, segments, line in self.uses:
            target = self.resolve(module, segments)
            if target is None:
                continue
            a, b = top_level(module), top_level(target)
            if a is None or b is None or a is b:
                continue
            if self.root.file in (a.file, b.file):
                continue
            found[(a.name, b.name)].append((module.file, line, "::".join(segments)))
        return found


def top_level(module):
    """The module the crate root declares that holds `module`, or None for the root itself."""
    if module.parent is None:
        return None
    while module.parent.parent is not None:
        module = module.parent
    return module


def ancestor_files(module):
    """The files of `module` and of the modules that hold it: what a file uses there is its
    part's shared core, or its own."""
    files = set()
    while module is not None:
        files.add(module.file)
        module = module.parent
    return files


def use_tree(tokens, i, prefix):
    """The paths of the use tree at `i` as ([segments], alias), and the index after it."""
    segments = list(prefix)
    paths = []
    while i < len(tokens):
        kind, value, _ = tokens[i]
        if value == "::":
            i += 1
        elif value == "{":
            i += 1
            while i < len(tokens) and tokens[i][1] != "}":
                sub, i = use_tree(tokens, i, segments)
                paths.extend(sub)
                if i < len(tokens) and tokens[i][1] == ",":
                    i += 1
            return paths, i + 1
        elif value == "*":
            return paths + [(segments + ["*"], None)], i + 1
        elif kind == "id" and value == "as":
            alias = tokens[i + 1][1] if i + 1 < len(tokens) else None
            return paths + [(segments, alias)], i + 2
        elif kind == "id":
            segments.append(value)
            i += 1
        else:  # `,` `}` `;`: this branch of the tree ends
            return paths + [(segments, None)], i
    return paths + [(segments, None)], i


def read_path(tokens, i):
    """The segments of the path starting at `i` (up to a generic argument or the path's end)."""
    segments = [tokens[i][1]]
    i += 1
    while i + 1 < len(tokens) and tokens[i][1] == "::" and tokens[i + 1][0] == "id":
        segments.append(tokens[i + 1][1])
        i += 2
    return segments, i


# ---------------------------------------------------------------- cycles


def strongly_connected(nodes, succ):
    """Tarjan's components, iteratively; those of more than one file are cycles."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = 0
    for start in sorted(nodes):
        if start in index:
            continue
        work = [(start, iter(sorted(succ[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(succ[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def shortest_cycle(component, succ):
    """One shortest cycle through the component's first file, as a list of files."""
    members = set(component)
    start = component[0]
    previous = {start: None}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(succ[node]):
                if child == start:
                    cycle = [node]
                    while previous[cycle[-1]] is not None:
                        cycle.append(previous[cycle[-1]])
                    return list(reversed(cycle)) + [start]
                if child in members and child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    return component


def cycles_of(edges):
    """[(cycle, component, edges)] for every cycle of the graph of `edges` ({(a, b): ...})."""
    succ = defaultdict(set)
    nodes = set()
    for a, b in edges:
        succ[a].add(b)
        nodes.update((a, b))
    return [
        (shortest_cycle(component, succ), component, edges)
        for component in strongly_connected(nodes, succ)
    ]


def find_cycles(root_files):
    """[(cycle as files, component, edges of the crate)] for every cycle between the crates'
    files, and load errors."""
    cycles, errors = [], []
    for root in root_files:
        crate = Crate(root)
        errors.extend(crate.errors)
        cycles.extend(cycles_of(crate.edges()))
    return cycles, errors


def find_module_cycles(root_files):
    """[(cycle as module names, component, edges of the crate)] for every cycle between the
    crates' top-level modules, and load errors."""
    cycles, errors = [], []
    for root in root_files:
        crate = Crate(root)
        errors.extend(crate.errors)
        cycles.extend(cycles_of(crate.module_edges()))
    return cycles, errors


def report(cycles, out):
    for cycle, component, edges in cycles:
        print("import cycle: " + " -> ".join(cycle), file=out)
        for a, b in zip(cycle, cycle[1:]):
            line, written = edges[(a, b)][0]
            print(f"  {a}:{line}: {written}", file=out)
        if len(component) > len(cycle) - 1:
            print("  (files in the same tangle: " + ", ".join(component) + ")", file=out)


def report_modules(cycles, out):
    for cycle, component, edges in cycles:
        print("module cycle: " + " -> ".join(cycle), file=out)
        for a, b in zip(cycle, cycle[1:]):
            file, line, written = edges[(a, b)][0]
            print(f"  {a} -> {b}: {file}:{line}: {written}", file=out)
        if len(component) > len(cycle) - 1:
            print("  (modules in the same tangle: " + ", ".join(component) + ")", file=out)


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("roots", nargs="*", default=["src/lib.rs"])
    parser.add_argument(
        "--report-only", action="store_true", help="print the cycles but exit 0"
    )
    args = parser.parse_args(argv)
    cycles, errors = find_cycles(args.roots)
    module_cycles, _ = find_module_cycles(args.roots)  # the same crates: the same errors
    for error in errors:
        print(error, file=sys.stderr)
    report(cycles, sys.stdout)
    if not cycles:
        print("no import cycles")
    report_modules(module_cycles, sys.stdout)
    if not module_cycles:
        print("no cycles between top-level modules")
    if errors or ((cycles or module_cycles) and not args.report_only):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
