"""The LM tokenizer (diablogpt_pytorch.tokenizer): round trips, determinism, reuse, loaders."""

import json

import pytest

from diablogpt_pytorch import tokenizer as lmt
from diablogpt_pytorch.corpus import write_default_corpus

TRICKY = ("Hello World\n    x = 1\tCafé\r\n\n"
          "def f(a, b):\n\treturn {'K': a ** b}  # naïve 東京 🙂 Ωmega\n"
          "literal specials: <eos> <pad> [SEP] [PAD] </s>\n   trailing spaces   ")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    write_default_corpus(folder)
    return sorted(folder.glob("**/*.txt"))


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    return lmt.train_bpe_tokenizer(corpus[:40], tmp_path_factory.mktemp("tok") / "t.json", 1024)


def test_trained_tokenizer_round_trips_real_text_losslessly(trained, corpus):
    assert (trained.vocab_size, trained.pad_id, trained.eos_id) == (1024, 0, 1)
    # documents it was not trained on, plus code, tabs, capitals, CRLF and characters never seen
    for text in [TRICKY] + [p.read_text() for p in corpus[40:45]]:
        ids = trained.encode(text)
        assert trained.decode(ids) == text
        assert all(0 <= i < trained.vocab_size for i in ids)
        # special-token strings in the text are text, never the pad or eos id
        assert trained.pad_id not in ids and trained.eos_id not in ids
    assert trained.decode_batch(trained.encode_batch(["A\nB", "c\td"])) == ["A\nB", "c\td"]
    # decode drops pad and eos ids
    assert trained.decode([0] + trained.encode("Ab") + [1, 0]) == "Ab"
    # merges learned from the corpus: real text takes far fewer tokens than bytes
    text = corpus[41].read_text()
    assert len(trained.encode(text)) < 0.5 * len(text.encode())


def test_wordpiece_default_is_lossy_and_keeps_the_seed_vocabulary():
    bert = lmt.load_tokenizer(None)
    assert isinstance(bert, lmt.BertLMTokenizer) and lmt.load_tokenizer("bert").identity() == bert.identity()
    assert (bert.vocab_size, bert.pad_id, bert.eos_id) == (30522, 0, 102)
    a = bert.encode("Hello World\n    x = 1\tCafé")
    assert a == bert.encode("hello world x = 1 cafe")  # why the LM gets its own tokenizer
    assert bert.decode(a) == "hello world x = 1 cafe"
    assert 102 not in bert.encode("a [SEP] b")


def test_training_is_deterministic_reused_and_retrained_when_documents_change(corpus, tmp_path, caplog):
    docs = corpus[:20]
    a = lmt.train_bpe_tokenizer(docs, tmp_path / "a.json", 700)
    b = lmt.train_bpe_tokenizer(docs, tmp_path / "b.json", 700)
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert a.fingerprint() == b.fingerprint()
    mtime = (tmp_path / "a.json").stat().st_mtime_ns
    with caplog.at_level("INFO", logger="diablogpt_pytorch.tokenizer"):
        lmt.load_tokenizer("train", documents=docs, path=tmp_path / "a.json", vocab_size=700)
    assert "reusing tokenizer" in caplog.text
    assert (tmp_path / "a.json").stat().st_mtime_ns == mtime
    c = lmt.load_tokenizer("train", documents=corpus[20:40], path=tmp_path / "a.json", vocab_size=700)
    assert c.fingerprint() != a.fingerprint()
    assert not list(tmp_path.glob("*.tmp*"))


def test_hugging_face_directory_loads_offline(trained, tmp_path):
    from transformers import PreTrainedTokenizerFast

    # a tiny tokenizer folder, as save_pretrained writes it: one with a pad token, one without
    with_pad = PreTrainedTokenizerFast(tokenizer_file=str(trained.path), eos_token="<eos>",
                                       pad_token="<pad>")
    with_pad.save_pretrained(tmp_path / "with_pad")
    tok = lmt.load_tokenizer(tmp_path / "with_pad")
    assert isinstance(tok, lmt.HFDirLMTokenizer)
    assert (tok.vocab_size, tok.pad_id, tok.eos_id) == (1024, 0, 1)
    assert tok.encode(TRICKY) == trained.encode(TRICKY)
    assert tok.decode(tok.encode(TRICKY)) == TRICKY
    no_pad = PreTrainedTokenizerFast(tokenizer_file=str(trained.path), eos_token="<eos>")
    no_pad.save_pretrained(tmp_path / "no_pad")
    tok = lmt.load_tokenizer(str(tmp_path / "no_pad"))
    assert (tok.vocab_size, tok.pad_id) == (1025, 1024)  # a pad id appended after the vocabulary
    assert tok.fingerprint() != lmt.load_tokenizer(tmp_path / "with_pad").fingerprint()
    # the tokenizer.json file itself loads too
    assert lmt.load_tokenizer(trained.path).identity() == trained.identity()


def test_sentencepiece_model_file(corpus, tmp_path):
    spm = pytest.importorskip("sentencepiece")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(p.read_text() for p in corpus[:30]), model_prefix=str(tmp_path / "sp"),
        vocab_size=600, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        pad_id=0, unk_id=1, bos_id=-1, eos_id=2, num_threads=1, minloglevel=2)
    tok = lmt.load_tokenizer(tmp_path / "sp.model")
    assert isinstance(tok, lmt.SentencePieceLMTokenizer)
    assert (tok.vocab_size, tok.pad_id, tok.eos_id) == (600, 0, 2)
    text = "Hello World  x = 1\tCafé 東京"  # byte fallback for characters the corpus lacks
    assert tok.decode(tok.encode(text)) == text


def test_bad_specs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="is not 'bert', 'train'"):
        lmt.load_tokenizer(tmp_path / "missing.model")
    with pytest.raises(ValueError, match="needs documents="):
        lmt.load_tokenizer("train")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"not": "a tokenizer"}))
    with pytest.raises(ValueError, match="bad.json is not a tokenizers"):
        lmt.load_tokenizer(bad)
    with pytest.raises(ValueError, match="too small"):
        lmt.train_bpe_tokenizer(["a b c"], tmp_path / "t.json", vocab_size=100)
