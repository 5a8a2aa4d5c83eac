from calq.calibration.corpus import TRAIN_PERCENT, split_of, stdlib_documents, stdlib_root


def test_split_is_stable_and_disjoint():
    train = {d.name for d in stdlib_documents("train")}
    test = {d.name for d in stdlib_documents("test")}
    everything = [d.name for d in stdlib_documents("all")]
    assert train.isdisjoint(test)
    assert train | test == set(everything)
    assert len(everything) == len(set(everything))
    # the same name always lands on the same side (a pure function of the name)
    assert [split_of(n) for n in everything] == [split_of(n) for n in everything]
    assert split_of("os.py") == split_of("os.py")


def test_split_proportions_near_ninety_ten():
    n_train, n_all = len(stdlib_documents("train")), len(stdlib_documents("all"))
    assert abs(100 * n_train / n_all - TRAIN_PERCENT) < 3   # sha256 buckets are uniform; 1800 docs


def test_corpus_content_is_stdlib_source_and_pydoc_text():
    docs = stdlib_documents("all")
    names = {d.name for d in docs}
    assert "os.py" in names and "json/__init__.py" in names
    assert not any(n.startswith("site-packages/") for n in names)
    assert any(n.startswith("pydoc_data.topics:") for n in names)
    assert (stdlib_root() / "os.py").read_text(encoding="utf-8") == next(d.text for d in docs if d.name == "os.py")
