"""The retention recorder against hand counts, the token-kind heuristic, and the HTML/PNG/table outputs."""
import re
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

import msrnn
import msrnn.cli as cli
from msrnn.cli import main
from msrnn.config import Config
from msrnn.inspect import RetentionResult, record_retention, retention_html, token_kind, write_report
from msrnn.policies import make_policy

T = 23  # tokens per test text
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def model():
    """A tiny random Llama built directly from a Config (2 layers, 4 query heads over 2 kv heads)."""
    torch.manual_seed(0)
    cfg = Config(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    return msrnn.Transformer(cfg).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 97, (T,), generator=torch.Generator().manual_seed(1)).tolist()


class FakeTokenizer:
    """One id per character; each id decodes to a piece chosen to stress HTML escaping and the kind heuristic."""

    PIECES = ["<b>", " &amp;", "\n", ' "', "'s", " Élan", "”", ",", " the", "x<y", " London"]

    def encode(self, text):
        return [ord(c) % 97 for c in text]

    def decode(self, ids):
        return "".join(self.PIECES[i % len(self.PIECES)] for i in ids)


# --- retention by hand ------------------------------------------------------------------------------------------
def expected_closed_form(name: str, k: int, sinks: int = 4) -> np.ndarray:
    """(T,) steps kept, derived from the semantics: token t enters at step t; at a step where the state would exceed
    k, the policy drops after attending, so the dropped token was attended at that step too."""
    t = np.arange(T)
    to_end = T - t  # survives until the last step T-1
    if name == "full":
        return to_end
    if name == "window":  # held after steps t..t+k-1, attended and dropped at step t+k
        return np.minimum(k + 1, to_end)
    if name == "sinks":
        return np.where(t < sinks, to_end, np.minimum(k - sinks + 1, to_end))
    if name == "baseline":  # chunks of k+1 tokens, all dropped at the chunk's last step
        chunk_end = (t // (k + 1)) * (k + 1) + k
        return np.minimum(chunk_end, T - 1) - t + 1
    raise ValueError(name)


@pytest.mark.parametrize("name", ["window", "sinks", "baseline", "full"])
@pytest.mark.parametrize("k", [5, 8])
def test_policies_without_attention_match_the_closed_form(model, ids, name, k):
    result = record_retention(model, ids, make_policy(name, k) if name != "full" else None)
    want = expected_closed_form(name, k)
    assert result.kept.shape == (2, T) and result.kept_heads.shape == (2, 2, T)
    assert (result.kept == want).all() and (result.kept_heads == want).all()  # every layer and kv head


def hand_count(model, ids, policy) -> np.ndarray:
    """(L, T) retention counted the slow way: step every token from an empty state, and at each step s count every
    token the step's query attended to in a layer: the new token s and the tokens ANY kv head held before."""
    L, state = model.cfg.num_hidden_layers, model.init_state(1, policy)
    counts = np.zeros((L, len(ids)), dtype=int)
    held = [set() for _ in range(L)]
    for s, token in enumerate(ids):
        model.step(torch.tensor([token]), state, policy)
        for i, layer in enumerate(state.layers):
            for t in held[i] | {s}:
                counts[i, t] += 1
            held[i] = {int(p) for p in layer.pos[0, :, : layer.size].flatten() if p >= 0}
    return counts


@pytest.mark.parametrize("name", ["tova", "tova-head", "h2o"])
def test_attention_policies_match_a_hand_count(model, ids, name):
    policy = make_policy(name, 5)
    result = record_retention(model, ids, policy)
    assert (result.kept == hand_count(model, ids, policy)).all()
    assert (result.kept == result.kept_heads.max(axis=1)).all()  # a layer keeps what any of its heads keeps


def test_tova_dropping_the_newest_token_counts_one_step(model, ids):
    result = record_retention(model, ids, make_policy("tova", 3))
    assert result.kept.min() >= 1 and result.kept[:, -1].tolist() == [1, 1]
    assert (result.kept <= result.available).all()


# --- token kinds --------------------------------------------------------------------------------------------------
def test_token_kinds_by_hand():
    pieces = ["“", "I", "’", "m", " sure", ",”", " said", " Mr", ".", " Benn", "et", "’", "s", " wife", ".", ' "',
              "Yes", '."', " said", " Elizabeth", "'s", "\n", "\n", "It", " was", " London", ' "', "he", " said", '"',
              " [", "Illustration"]
    kinds = [token_kind(pieces, i) for i in range(len(pieces))]

    def of(kind):
        return [p for p, k in zip(pieces, kinds) if k == kind]

    assert kinds[0] == "first token"
    assert of("proper noun") == [" Mr", " Benn", " Elizabeth", " London"]  # not "I", "It", "Yes", "Illustration"
    assert of("closing quote") == [",”", '."', '"']
    assert of("possessive 's") == ["s", "'s"]
    assert of("newline") == ["\n", "\n"]
    assert of("punctuation") == ["’", ".", "’", ".", ' "', ' "', " ["]  # the apostrophes of I’m and Bennet’s


def test_by_kind_means():
    pieces = ["A", " cat", ",", "\n", " Paris", " sat"]
    kept = np.array([[6, 1, 4, 3, 2, 1], [6, 3, 4, 1, 2, 1]])
    result = RetentionResult(list(range(6)), pieces, kept, kept[:, None], "tova", 2)
    rows = {r["kind"]: r for r in result.by_kind()}
    assert rows["first token"]["mean_kept"] == 6 and rows["first token"]["mean_share"] == 1
    assert rows["other"]["tokens"] == 2 and rows["other"]["mean_kept"] == pytest.approx((2 + 1) / 2)
    assert rows["proper noun"]["mean_share"] == pytest.approx(2 / 2)  # " Paris": 2 of the 2 steps left
    assert result.by_kind(layer=1)[1]["kind"] == "newline" and result.by_kind(layer=1)[1]["mean_kept"] == 1


# --- outputs ------------------------------------------------------------------------------------------------------
class TokenSpans(HTMLParser):
    """Collects the text of every <span> inside <div class="text">."""

    def __init__(self):
        super().__init__()
        self.in_text, self.depth, self.spans = False, 0, []

    def handle_starttag(self, tag, attrs):
        if tag == "div" and ("class", "text") in attrs:
            self.in_text = True
        elif self.in_text and tag == "span":
            self.spans.append("")

    def handle_endtag(self, tag):
        if tag == "div":
            self.in_text = False

    def handle_data(self, data):
        if self.in_text and self.spans:
            self.spans[-1] += data


def test_report_html_has_every_token_escaped_and_png_and_tables(model, tmp_path):
    tokenizer = FakeTokenizer()
    ids = list(range(T))
    result = record_retention(model, ids, make_policy("tova", 5), tokenizer=tokenizer)
    paths = write_report(result, tmp_path)
    page = paths[0].read_text(encoding="utf-8")
    parser = TokenSpans()
    parser.feed(page)
    parser.close()
    assert parser.spans == [tokenizer.decode([i]) for i in ids]  # every token, in order, unescaped back exactly
    assert "<b>" not in page.split('<div class="text">')[1]  # the raw piece never reaches the markup
    assert paths[1].read_bytes()[:8] == PNG_MAGIC
    assert paths[2].read_text().startswith("| kind | tokens |")
    assert paths[3].read_text().splitlines()[0] == "kind,tokens,mean_kept,mean_share"
    assert len(paths[4].read_text(encoding="utf-8").splitlines()) > T  # header + one row per token (+ newlines)
    assert "layer 1" in retention_html(result, layer=1)


def test_cli_writes_the_report(model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "load_model_and_tokenizer", lambda args: (model, FakeTokenizer()))
    text = tmp_path / "text.txt"
    text.write_text("It was a dark and stormy night; the rain fell in torrents.", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["inspect", "--text", str(text), "--policy", "window", "--states", "4", "--tokens", "20",
                 "--layer", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("window, 4 states, 20 tokens, layer 1: ")  # a summary in the terminal, then the table
    assert "mean share of available steps" in printed and "| kind | tokens |" in printed
    assert f"wrote {out}/retention.html" in printed and all(p.name in printed for p in out.iterdir())
    assert (out / "retention.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("argv, message", [
    (["--text", "missing.txt"], "no such file"),
    (["--text", "{text}", "--layer", "2"], "out of range"),
    (["--text", "{text}", "--states", "0"], "not a valid budget"),
])
def test_cli_errors_are_one_line(model, tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.setattr(cli, "load_model_and_tokenizer", lambda args: (model, FakeTokenizer()))
    text = tmp_path / "text.txt"
    text.write_text("Some text.", encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", *[a.format(text=text) for a in argv], "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("msrnn: error:") and message in err


def test_pictures_shade_the_share_of_the_available_steps_not_raw_steps(monkeypatch, tmp_path):
    """A token at the end of the text that stayed to the end is shaded as fully as the first token that stayed
    throughout: both were kept for every step they could be (raw steps made the end of the text look evicted)."""
    import matplotlib.axes

    from msrnn.inspect import MAX_ALPHA, plot_heatmap

    pieces = ["A", " cat", " sat", " on", " mat", "."]
    kept = np.array([[6, 1, 1, 1, 2, 1], [6, 1, 1, 3, 2, 1]])  # the first and the last two: kept all they could
    result = RetentionResult(list(range(6)), pieces, kept, kept[:, None], "tova", 2)
    page = retention_html(result, layer=0)
    alphas = [float(a) for a in re.findall(r"rgba\(200,30,30,([0-9.]+)\)\" title", page)]
    assert alphas[0] == alphas[4] == alphas[5] == pytest.approx(MAX_ALPHA)  # share 1 each
    assert alphas[1] == pytest.approx(MAX_ALPHA / 5)  # kept 1 of its 5 steps
    assert "share of the steps it could stay" in page
    shown = []
    original = matplotlib.axes.Axes.imshow
    monkeypatch.setattr(matplotlib.axes.Axes, "imshow",
                        lambda self, data, *a, **k: shown.append(np.asarray(data)) or original(self, data, *a, **k))
    plot_heatmap(result, tmp_path / "r.png")
    np.testing.assert_allclose(shown[0], kept / np.arange(6, 0, -1))
