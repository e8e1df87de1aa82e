""".dockerignore rules (sandbox/images/dockerignore.py) against Docker's documented examples
and moby/patternmatcher's behaviour: comments, exceptions, cleaning, `**`, directory
patterns, escapes, and the patterns Docker refuses."""

from __future__ import annotations

import pytest

from sandbox.errors import ImageError
from sandbox.images.dockerignore import BadPattern, IgnoreRules, clean, glob, has_wildcards


def excluded(text: str, path: str) -> bool:
    return IgnoreRules.parse(text).excluded(path)


# Docker's reference (the .dockerignore section of the Dockerfile reference).
DOCS = "# comment\n*/temp*\n*/*/temp*\ntemp?\n"


@pytest.mark.parametrize(("path", "out"), [
    ("somedir/temporary.txt", True),     # */temp*
    ("somedir/temp", True),
    ("temporary.txt", False),            # */temp* needs one directory above
    ("somedir/subdir/temporary.txt", True),  # */*/temp*
    ("a/b/c/temp", False),
    ("tempa", True),                     # temp?
    ("tempb", True),
    ("temp", False),
    ("tempab", False),
    ("# comment", False),
])
def test_docs_example(path: str, out: bool) -> None:
    assert excluded(DOCS, path) is out


@pytest.mark.parametrize(("text", "path", "out"), [
    ("**/*.go", "main.go", True),
    ("**/*.go", "cmd/tool/main.go", True),
    ("**/*.go", "main.golden", False),
    ("*.md\n!README.md\n", "README.md", False),
    ("*.md\n!README.md\n", "CHANGES.md", True),
    ("*.md\n!README.md\n", "docs/x.md", False),            # * stays in one directory
    ("*.md\n!README*.md\nREADME-secret.md\n", "README-secret.md", True),
    ("*.md\n!README*.md\nREADME-secret.md\n", "README-public.md", False),
    ("!README.md\n*.md\n", "README.md", True),             # the later line wins
])
def test_exceptions_and_doublestar(text: str, path: str, out: bool) -> None:
    assert excluded(text, path) is out


@pytest.mark.parametrize(("text", "path", "out"), [
    ("docs", "docs", True),
    ("docs", "docs/a/b.txt", True),                        # a directory takes what it holds
    ("docs/", "docs/a", True),
    ("docs/*", "docs/sub/deep.txt", True),
    ("docs", "docsx/a", False),
    ("docs\n!docs/README.md\n", "docs/README.md", False),  # re-included below it
    ("docs\n!docs/README.md\n", "docs/other.md", True),
    ("docs\n!docs/keep\n", "docs/keep/x/y", False),
    ("**\n!util/docker/web\n", "util/docker/web/foo", False),
    ("**\n!util/docker/web\nutil/docker/web/foo\n", "util/docker/web/foo", True),
    ("a*", "ab/c", True),                                  # via the parent "ab"
])
def test_directory_patterns(text: str, path: str, out: bool) -> None:
    assert excluded(text, path) is out


@pytest.mark.parametrize(("text", "path", "out"), [
    ("/build", "build/x", True),                  # a leading / is the context root
    ("! /keep\n", "keep", False),
    ("*\n! /keep\n", "keep", False),
    ("*\n! /keep\n", "other", True),
    ("a/../b", "b", True),                        # cleaned
    ("./c//d/", "c/d", True),
    ("  spaced  \n", "spaced", True),             # trimmed
    (" # not a comment\n", "# not a comment", True),  # only column 1 starts a comment
    ("\ufeffbom\n", "bom", True),                 # a BOM before the first line
    ("one\r\ntwo\r\n", "two", True),              # CRLF lines
    ("*", "", False),                             # the root is never excluded
])
def test_cleaning_and_lines(text: str, path: str, out: bool) -> None:
    assert excluded(text, path) is out


@pytest.mark.parametrize(("pattern", "path", "out"), [
    # moby/patternmatcher's TestMatches, the single-pattern cases (parents included).
    ("**", "dir/file", True),
    ("**/", "file", True),
    ("**/**", "dir/file", True),
    ("dir/**", "dir/dir2/file", True),
    ("**/dir", "dir", True),
    ("**/dir", "dir/file", True),
    ("**/dir2/*", "dir/dir2/file", True),
    ("**/dir2/**", "dir/dir2/dir3/file", True),
    ("**file", "file", True),
    ("**file", "dir/file", True),
    ("**file", "dir/myfile", True),               # moby's suffix match, kept
    ("**/file*.txt", "dir/dir/file.txt", True),
    ("**/**/*.txt2", "dir/dir/file.txt", False),
    ("a**/*.txt", "a/dir/dir/file.txt", True),
    ("a/*.txt", "a/dir/file.txt", False),
    ("a[b-d]e", "ace", True),
    ("a[b-d]e", "aae", False),
    ("a[^b-d]e", "aze", True),
    (".*", ".foo", True),
    (".*", "foo", False),
    ("abc.def", "abcZdef", False),
    ("abc?def", "abcZdef", True),
    ("abc/**", "abc", False),
    ("abc/**", "abc/def/ghi", True),
    ("**/.foo", "bar.foo", False),
    ("a(b)c/def", "a(b)c/def", True),
    ("a.|)$(}+{bc", "a.|)$(}+{bc", True),
    ("dist/*.whl", "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl", True),
    ("a\\\\", "a\\", True),                       # an escaped backslash
    ("a\\*b", "a*b", True),                       # an escaped star is a star
    ("a\\*b", "axb", False),
    ("\\[x\\]", "[x]", True),
    ("a\\d", "ad", True),                         # \d is a d, not a digit class
    ("[\\]a]", "]", True),
    ("[x\\-]", "-", True),
])
def test_moby_match_table(pattern: str, path: str, out: bool) -> None:
    assert excluded(pattern, path) is out


@pytest.mark.parametrize(("text", "line", "words"), [
    ("ok\n[\n", 2, "never closed"),
    ("[]a]", 1, "class"),
    ("[-x]", 1, "class"),
    ("[x-]", 1, "class"),
    ("[a-b-c]", 1, "class"),
    ("[z-a]", 1, "backwards"),
    ("# c\n\nabc\\", 3, "escapes nothing"),
    ("a\n!\n", 2, "'!' alone"),
    ("a\n!   \n", 2, "'!' alone"),
])
def test_bad_patterns_name_the_line(text: str, line: int, words: str) -> None:
    with pytest.raises(ImageError) as e:
        IgnoreRules.parse(text)
    assert f".dockerignore:{line}:" in str(e.value)
    assert words in str(e.value)


def test_errors_name_the_file_they_come_from() -> None:
    with pytest.raises(ImageError, match=r"^app\.Dockerfile\.dockerignore:1: "):
        IgnoreRules.parse("[", "app.Dockerfile.dockerignore")


def test_step_and_decide_agree_with_excluded() -> None:
    rules = IgnoreRules.parse("docs\n!docs/keep\n*.log\n")
    for path in ["docs", "docs/keep", "docs/keep/a", "docs/x", "a.log", "b/a.log", "src"]:
        parts = path.split("/")
        matched = None
        for i in range(len(parts)):
            matched = rules.step("/".join(parts[:i + 1]), matched)
        assert matched is not None
        assert rules.decide(matched) is rules.excluded(path), path


def test_no_rules_exclude_nothing() -> None:
    rules = IgnoreRules.parse("# only a comment\n\n")
    assert not rules and not rules.excluded("anything")


@pytest.mark.parametrize(("path", "out"), [
    ("", "."), ("a//b/./c/", "a/b/c"), ("a/../../b", "../b"), ("/../a", "/a"),
    ("/", "/"), ("./", "."),
])
def test_clean_is_go_filepath_clean(path: str, out: str) -> None:
    assert clean(path) == out


@pytest.mark.parametrize(("source", "out"), [
    ("*.txt", True), ("a?", True), ("[ab]", True), ("a\\*", False), ("plain/path", False),
    ("a\\\\*", True),
])
def test_has_wildcards_as_buildkit(source: str, out: bool) -> None:
    assert has_wildcards(source) is out


def test_glob_without_doublestar_is_filepath_match() -> None:
    assert glob("**.txt").fullmatch("a.txt")
    assert not glob("**.txt").fullmatch("a/b.txt")  # `**` is `*` in COPY sources
    assert glob("*").fullmatch(".hidden")           # Go matches dotfiles with *
    with pytest.raises(BadPattern):
        glob("[")
