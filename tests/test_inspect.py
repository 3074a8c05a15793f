"""`sdd inspect`: the per-token records against the loss that trains on them, the page's numbers, the command
on a real toy run (warmup then distill), its bad input, and the page in a real headless chromium.

The per-token KL is checked against sdd.losses.divergence_loss on the same sequences (its default
implementation, TRL's kernel where importable: another code path than the readable torch one the records
use), and the sampled token's probability against the model's own logits from a plain forward pass.
"""

from __future__ import annotations

import html
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import sdd, sdd_process, set_tiny

from sdd import data
from sdd.analysis import inspect_page
from sdd.analysis.tokens import SampleRecord, TokenRecord, mass_share, score_samples, summarize, token_pieces
from sdd.losses import divergence_loss

TEXTS = ["We have 1+2=3. So \\boxed{3}.<|im_end|>", "5-4=1, then 1+9=10. So \\boxed{10}.", "x é × 3"]


@pytest.fixture(scope="module")
def toy_models(toy_template):
    """The toy's untrained teacher and student (one tokenizer), and three prompt/completion pairs."""
    from sdd.models import load_causal_lm, load_tokenizer

    base = toy_template / "toy"
    tokenizer = load_tokenizer(str(base / "teacher-base"))
    teacher = load_causal_lm(str(base / "teacher-base")).eval()
    student = load_causal_lm(str(base / "student-base")).eval()
    prompts = [data.render_prompt(tokenizer, q, {"enable_thinking": False})
               for q in ("Compute 1+2.", "Compute 5-4+9.", "Compute 3.")]
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    completion_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    return student, teacher, tokenizer, prompt_ids, completion_ids


def hidden(model, ids: list[int]) -> torch.Tensor:
    return model.base_model(input_ids=torch.tensor([ids])).last_hidden_state[0]


def test_kl_per_token_sums_to_the_loss_and_p_is_the_models_own(toy_models):
    student, teacher, tokenizer, prompt_ids, completion_ids = toy_models
    vocab = len(tokenizer)
    records = score_samples(student, teacher, tokenizer, prompt_ids, completion_ids, vocab_size=vocab, top_k=5,
                            batch_size=2)  # two batches, one of them padded
    assert [r.completion_ids for r in records] == completion_ids
    for record, prompt, completion in zip(records, prompt_ids, completion_ids, strict=True):
        assert len(record.tokens) == len(completion)
        ids = prompt + completion
        scored = slice(len(prompt) - 1, len(ids) - 1)  # positions that predict the completion
        with torch.no_grad():
            h_s, h_t = hidden(student, ids)[scored], hidden(teacher, ids)[scored]
            loss, _ = divergence_loss(h_s[None], student.get_output_embeddings().weight, h_t[None],
                                      teacher.get_output_embeddings().weight,
                                      torch.ones(1, len(completion), dtype=torch.bool), beta=1.0, vocab_size=vocab)
            logits_s = student(input_ids=torch.tensor([ids])).logits[0, scored, :vocab]
            logits_t = teacher(input_ids=torch.tensor([ids])).logits[0, scored, :vocab]
        assert math.isclose(record.kl_sum, float(loss) * len(completion), rel_tol=1e-4)
        assert all(t.kl >= -1e-6 for t in record.tokens)
        chosen = torch.tensor(completion)[:, None]
        p_s = logits_s.softmax(-1).gather(-1, chosen)[:, 0].tolist()
        p_t = logits_t.softmax(-1).gather(-1, chosen)[:, 0].tolist()
        assert [t.student_p for t in record.tokens] == pytest.approx(p_s, rel=1e-4)
        assert [t.teacher_p for t in record.tokens] == pytest.approx(p_t, rel=1e-4)
        top_ids = logits_t.topk(5, dim=-1).indices.tolist()
        assert [[text for text, _ in t.teacher_top] for t in record.tokens] == \
            [[tokenizer.decode([i]) for i in row] for row in top_ids]


def test_teacher_top_k_probabilities(toy_models):
    student, teacher, tokenizer, prompt_ids, completion_ids = toy_models
    vocab = len(tokenizer)
    for k in (1, 5):
        for record in score_samples(student, teacher, tokenizer, prompt_ids, completion_ids, vocab_size=vocab, top_k=k):
            for token in record.tokens:
                probs = [p for _, p in token.teacher_top]
                assert len(probs) == k and probs == sorted(probs, reverse=True)
                assert all(0 < p <= 1 for p in probs) and sum(probs) <= 1 + 1e-6
                if token.teacher_rank >= 0:
                    assert token.teacher_p == pytest.approx(probs[token.teacher_rank], rel=1e-5)
                else:
                    assert token.teacher_p <= probs[-1] + 1e-7
    # the whole vocabulary as top-k: probabilities sum to one and every sampled token has a rank
    whole = score_samples(student, teacher, tokenizer, prompt_ids[:1], completion_ids[:1], vocab_size=vocab,
                          top_k=vocab)[0]
    for token in whole.tokens:
        assert sum(p for _, p in token.teacher_top) == pytest.approx(1.0, abs=1e-5)
        assert token.teacher_top[token.teacher_rank][1] == pytest.approx(token.teacher_p, rel=1e-5)


def test_a_model_against_itself_has_zero_kl(toy_models):
    student, _, tokenizer, prompt_ids, completion_ids = toy_models
    records = score_samples(student, student, tokenizer, prompt_ids, completion_ids, vocab_size=len(tokenizer))
    kls = [t.kl for r in records for t in r.tokens]
    assert len(kls) == sum(map(len, completion_ids)) and max(abs(k) for k in kls) < 1e-5
    assert all(t.student_p == pytest.approx(t.teacher_p, rel=1e-5) for r in records for t in r.tokens)
    empty = score_samples(student, student, tokenizer, prompt_ids[:2], [completion_ids[0], []], vocab_size=len(tokenizer))
    assert len(empty[0].tokens) == len(completion_ids[0]) and empty[1].tokens == []


def test_token_pieces_join_to_the_decoded_text(toy_models):
    tokenizer = toy_models[2]
    for text in [*TEXTS, "ends in é", "日本"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for cut in (ids, ids[:-1]):  # the second may end inside a character
            pieces = token_pieces(tokenizer, cut)
            assert len(pieces) == len(cut)
            assert "".join(pieces) == tokenizer.decode(cut, skip_special_tokens=False)
    ids = tokenizer("é", add_special_tokens=False)["input_ids"]
    assert len(ids) == 2 and token_pieces(tokenizer, ids) == ["", "é"]  # two bytes: the second completes it


def record(kls: list[float], correct: bool | None, text: str = "a") -> SampleRecord:
    return SampleRecord([1], [2] * len(kls), [TokenRecord(2, text, k, 0.5, 0.5, [(text, 0.5)], 0) for k in kls], correct)


def test_mass_share_and_summary_on_known_numbers():
    assert mass_share([1.0] * 100, 0.05) == pytest.approx(0.05)
    assert mass_share([10.0] + [0.0] * 19, 0.05) == 1.0  # ceil(5% of 20) = 1 token carries everything
    assert mass_share([3.0, 1.0], 0.05) == 0.75  # at least one token
    assert mass_share([], 0.05) is None and mass_share([0.0, 0.0], 0.05) is None
    samples = [record([1.0, 3.0], True, "x"), record([0.5] * 4, False, "y"), record([], None)]
    summary = summarize(samples)
    assert summary["tokens"] == 6 and summary["kl_sum"] == 6.0 and summary["mean_kl"] == 1.0
    assert summary["accuracy"] == 0.5
    assert summary["correct"] == {"samples": 1, "tokens": 2, "mean_kl": 2.0, "mean_sample_kl_sum": 4.0}
    assert summary["incorrect"] == {"samples": 1, "tokens": 4, "mean_kl": 0.5, "mean_sample_kl_sum": 2.0}
    assert summary["top5_share"] == 0.5  # ceil(0.3) = 1 token: 3 of 6
    assert summary["top_strings"][0] == {"text": "x", "count": 2, "share": 4 / 6, "mean_kl": 2.0}


def test_embedded_json_cannot_end_the_script_block():
    document = {"meta": {"title": "t</script><b>"}, "views": [], "selected": 0, "scale": 1.0,
                "x": "</script><!--", "y": 0.123456789}
    page = inspect_page.render(document)
    block = page.split('<script type="application/json" id="sdd-data">')[1].split("</script>")[0]
    assert json.loads(block)["x"] == "</script><!--" and json.loads(block)["y"] == 0.1235
    assert "<b>" not in page.split("<title>")[1].split("</title>")[0]


# --------------------------------------------------------------------------------------------------
# The command on a real toy run: warmup, then distill from it.


@pytest.fixture(scope="module")
def bridge_run(toy_template, tmp_path_factory) -> Path:
    """The layout of `sdd run`: base models in ROOT/shared, warmup then distill in ROOT/bridge/seed0."""
    from sdd.manifest import RunDir

    root = tmp_path_factory.mktemp("inspect")
    shared, run = root / "shared", root / "bridge" / "seed0"
    shutil.copytree(toy_template, shared)
    set_tiny(shared)
    RunDir(run).create()
    for name in ("train", "test"):
        RunDir(run).register_dataset(f"toy-{name}", shared / "toy" / "data" / f"{name}.jsonl")
    shutil.copy(shared / "config.yaml", run / "config.yaml")
    teacher = shared / "toy" / "teacher-base"
    sdd("warmup", "--run", run, "--teacher", teacher, "--student", shared / "toy" / "student-base")
    sdd("distill", "--run", run, "--teacher", teacher, "--student", run / "warmup" / "final")
    sdd("eval", "--run", run, "--role", "student", "--limit", "4", "--samples", "1")  # a record that is no bridge stage
    return run


def page_data(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    return json.loads(re.search(r'<script type="application/json" id="sdd-data">(.*?)</script>', text, re.S).group(1))


@pytest.fixture(scope="module")
def distill_page(bridge_run) -> Path:
    sdd("inspect", bridge_run, "--stage", "distill", "--problems", "3", "--top-k", "4")
    return bridge_run / "analysis" / "inspect-distill.html"


def test_inspect_distill_scores_both_bridge_stages(bridge_run, distill_page):
    from sdd.manifest import RunDir

    page = distill_page.read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page and "<link" not in page and " src=" not in page
    doc = page_data(distill_page)
    assert [v["label"] for v in doc["views"]] == ["warmup", "distill"] and doc["selected"] == 1
    records = RunDir(bridge_run).records()
    for view in doc["views"]:
        stage = records[view["label"]]
        assert view["student"]["path"] == str((bridge_run / view["label"] / "final").resolve())
        assert view["teacher"]["fingerprint"] == stage.inputs["teacher"].fingerprint
        assert len(view["samples"]) == 3
        test_set = bridge_run.parents[1] / "shared" / "toy" / "data" / "test.jsonl"
        ids = [json.loads(line)["id"] for line in test_set.open()][:3]
        assert [s["id"] for s in view["samples"]] == ids  # the run's eval benchmark, first problems
        tokens = [t for s in view["samples"] for t in s["tokens"]]
        assert view["summary"]["tokens"] == len(tokens) > 0
        assert view["summary"]["mean_kl"] == pytest.approx(sum(t[1] for t in tokens) / len(tokens), rel=1e-3)
        assert all(len(t[4]) == 4 for t in tokens)
        for sample in view["samples"]:
            assert sample["teacher"]["text"] and isinstance(sample["correct"], bool)
    # the two students are different models, so their samples differ; the teacher's answers are the same
    warmup, distill = doc["views"]
    assert [s["tokens"] for s in warmup["samples"]] != [s["tokens"] for s in distill["samples"]]
    assert [s["teacher"] for s in warmup["samples"]] == [s["teacher"] for s in distill["samples"]]
    assert "warmup → distill" in doc["change"]


def test_inspect_warmup_and_no_compare_and_any_pair(bridge_run, tmp_path):
    sdd("inspect", bridge_run, "--stage", "warmup", "--problems", "2", "--out", tmp_path / "w.html")
    doc = page_data(tmp_path / "w.html")
    assert [v["label"] for v in doc["views"]] == ["warmup", "distill"] and doc["selected"] == 0
    sdd("inspect", bridge_run, "--stage", "distill", "--problems", "2", "--no-compare", "--out", tmp_path / "d.html")
    assert [v["label"] for v in page_data(tmp_path / "d.html")["views"]] == ["distill"]
    teacher = bridge_run.parents[1] / "shared" / "toy" / "teacher-base"
    sdd("inspect", bridge_run, "--student", teacher, "--teacher", teacher, "--problems", "2", "--out", tmp_path / "p.html")
    (view,) = page_data(tmp_path / "p.html")["views"]
    assert view["summary"]["mean_kl"] == pytest.approx(0.0, abs=1e-5)  # a model against itself
    assert view["summary"]["accuracy"] == view["teacher_accuracy"]  # same model, same seed: the same answers


@pytest.mark.parametrize("argv, phrase", [
    (["--stage", "EVAL"], "is a eval stage; inspect a warmup or distill stage"),
    (["--stage", "nope"], "no stage 'nope'"),
    (["--student", "x"], "--student and --teacher go together"),
    (["--problems", "0"], "--problems must be at least 1"),
])
def test_bad_requests_are_one_line(bridge_run, argv, phrase, capsys):
    from sdd.cli import main
    from sdd.manifest import RunDir

    evals = [name for name, record in RunDir(bridge_run).records().items() if record.stage == "eval"]
    with pytest.raises(SystemExit) as exit_:
        main(["inspect", str(bridge_run), *[evals[0] if a == "EVAL" else a for a in argv]])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], lines


def test_not_a_run_dir_in_a_child_process(tmp_path):
    result = sdd_process("inspect", tmp_path, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: {tmp_path} is not a run dir (no manifest.json); pass the run dir of the stage to inspect"]


# --------------------------------------------------------------------------------------------------
# The page in a real browser: Debian's chromium, headless.


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("no chromium on PATH (Debian: apt-get install chromium); the page is not checked in a browser")


def headless(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args],
                          capture_output=True, text=True, timeout=120)


def test_page_renders_tokens_and_hover_in_chromium(distill_page, tmp_path):
    """--dump-dom after the page's script ran; the fragment hovers one token through the page's own handler."""
    browser = chromium()
    doc = page_data(distill_page)
    view = doc["views"][doc["selected"]]
    sample, token = max(((s, t) for s, smp in enumerate(view["samples"]) for t in range(len(smp["tokens"]))),
                        key=lambda st: view["samples"][st[0]]["tokens"][st[1]][1])
    url = f"{distill_page.resolve().as_uri()}#hover={sample}:{token}"
    result = headless(browser, tmp_path / "profile", "--dump-dom", url)
    dom = result.stdout
    assert result.returncode == 0 and "<body" in dom, result.stderr[-2000:]
    spans = re.findall(r'<span class="tok[^"]*" data-s="(\d+)" data-t="(\d+)" style="background:rgba\(229,83,75,([\d.]+)\)',
                       dom)
    assert len(spans) == sum(len(s["tokens"]) for s in view["samples"]) > 0
    assert re.search(rf'data-rendered-tokens="{len(spans)}"', dom)
    assert max(float(a) for _, _, a in spans) > 0.5  # coloured by KL, not blank
    tip = re.search(r'<div id="tip"[^>]*>(.*?)</table></div>', dom, re.S)
    assert tip and 'display: block' in re.search(r'<div id="tip"[^>]*>', dom).group(0)
    record = view["samples"][sample]["tokens"][token]
    shown = tip.group(1)
    rows = re.findall(r"<tr[^>]*><td><code>(.*?)</code></td><td><span[^>]*></span>([\d.e+-]+)</td></tr>", shown)
    assert [alt for alt, _ in rows] == [html.escape(json.dumps(a, ensure_ascii=False), quote=False) if a else
                                        "(part of a character)" for a, _ in record[4]]
    for (_, shown_p), (_, p) in zip(rows, record[4], strict=True):
        if 1e-3 <= p < 1:  # JS toPrecision(3) and Python's .3g agree on these
            assert shown_p == f"{p:.3g}".ljust(len(shown_p), "0")
    assert f"{record[1]:.3g}" in re.search(r'<div id="tip-kl">(.*?)</div>', shown).group(1)  # the token's KL
    assert 'id="summary-table"' in dom and dom.count('<div class="card"') == len(view["samples"])


def test_page_screenshot_in_chromium(distill_page, tmp_path):
    browser = chromium()
    from matplotlib.image import imread

    shot = tmp_path / "page.png"
    result = headless(browser, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,900",
                      distill_page.resolve().as_uri() + "#hover=0:3")
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    pixels = imread(str(shot))
    assert pixels.shape[:2] == (900, 1280)
    red, green = pixels[..., 0], pixels[..., 1]
    assert ((red - green) > 0.15).sum() > 200  # KL-coloured tokens are on screen
    assert (pixels[..., :3].std()) > 0.05  # not a blank page
