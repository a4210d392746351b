"""pyunlearn.forget, the guarded entry point (issue 25): it never reports success on a model that
lost more than its tolerance on the probe; it repairs within a budget and says what it did and
what it cost; it records a membership check when asked."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import pyunlearn as pu
from pyunlearn import data
from pyunlearn.cli import main
from pyunlearn.models import DigitsCNN, train
from pyunlearn.unlearn.guarded import (NOTHING_TO_REPLAY, REPLAY_KEEP, RequestShape, Tolerance, _membership,
                                      choose_repair, score)


def _recorded_digits(folder, epochs: int, **store_options):
    """DigitsCNN trained `epochs` epochs on 80% of the digits, recorded into folder/s.zarr:
    (folder, its final state, the training split, the test split)."""
    train_set, test_set = data.split(data.digits(), 0.2, seed=0)
    torch.manual_seed(0)
    model = DigitsCNN()
    store = pu.UpdateStore.create(folder / "s.zarr", model, **store_options)
    train(model, train_set, epochs=epochs, batch_size=32, lr=0.05, seed=0, stores=(store,))
    store.close()
    return folder, model.state_dict(), train_set, test_set


def _copy_of(run, tmp_path):
    """A test's own copy of a recorded run: (the trained model, its store opened for writing)."""
    import shutil

    folder, state = run[:2]
    shutil.copytree(folder / "s.zarr", tmp_path / "s.zarr")
    model = DigitsCNN()
    model.load_state_dict(state)
    return model, pu.UpdateStore.open(tmp_path / "s.zarr")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """Trained 6 epochs, recorded at keep 0.1; with a 10% random forget set. Read-only for the
    tests: each copies it (`_setup`)."""
    run = _recorded_digits(tmp_path_factory.mktemp("guarded"), 6, keep=0.1)
    train_set = run[2]
    forget_ids = train_set.ids[torch.randperm(len(train_set), generator=torch.Generator().manual_seed(1))[:144]]
    return (*run, forget_ids)


def _setup(digits_run, tmp_path):
    return (*_copy_of(digits_run, tmp_path), *digits_run[2:])


def test_without_retained_data_a_collapsed_probe_is_refused_and_the_model_restored(digits_run, tmp_path):
    model, store, train_set, test_set, forget_ids = _setup(digits_run, tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(pu.GuardFailedError, match="not within the tolerance.*restored and nothing was recorded. "
                                                  r"Give retained data to repair with \(retain_data, --retain\), or retrain$"):
        pu.forget(model, store, forget_ids, probe=test_set.draw(300, seed=0))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert len(store.ledger) == 1 and store.forgotten_ids().size == 0


def test_a_refusal_advises_only_what_applies_to_the_call(digits_run, tmp_path):
    """With retained data given, the advice is not to give it; with strategy="subtract", to let
    it repair; with a repair that ran out of budget, a larger budget."""
    model, store, train_set, test_set, forget_ids = _setup(digits_run, tmp_path)
    probe, retained = test_set.draw(300, seed=0), train_set.without(forget_ids)
    with pytest.raises(pu.GuardFailedError, match=r"Let it repair \(strategy='auto', --strategy auto\), or retrain$"):
        pu.forget(model, store, forget_ids, probe=probe, retain_data=retained, strategy="subtract")
    with pytest.raises(pu.GuardFailedError) as refused:
        pu.forget(model, store, forget_ids, probe=probe, retain_data=retained, budget=0.03)  # 2 increments fit
    assert "fine-tuned" in str(refused.value)
    assert str(refused.value).endswith("Give a larger budget (budget, --budget), or retrain")
    assert "retain_data" not in str(refused.value)


def test_repairs_bring_the_probe_back_and_the_record_says_what_was_done(digits_run, tmp_path):
    model, store, train_set, test_set, forget_ids = _setup(digits_run, tmp_path)
    probe, forget_ids = test_set.draw(300, seed=0), forget_ids[:40]  # 3% at random: most steps subtracted
    report = pu.forget(model, store, forget_ids, probe=probe, retain_data=train_set.without(forget_ids), budget=0.6,
                       request_id="R-1")
    assert report.forget.status == "applied" and report.forget.request_id == "R-1"
    assert not Tolerance().problems(report.before, report.final)
    assert not Tolerance().problems(report.before, score(model, probe))  # the model returned is the one measured
    assert Tolerance().problems(report.before, report.after_subtraction)  # subtraction alone had fallen
    assert 0 < report.retrain_share <= 0.6 and len(report.actions) >= 2
    (row,) = store.ledger.audit()
    assert row["method"] == "amnesiac+guard" and row["guard"]["retrain_share"] == f"{report.retrain_share:.4f}"
    assert row["fingerprint_after"] == pu.kernels.fingerprint(store.check_model(model))


def test_a_harmless_subtraction_is_not_repaired(digits_run, tmp_path):
    model, store, train_set, test_set, forget_ids = _setup(digits_run, tmp_path)
    report = pu.forget(model, store, forget_ids[:1], probe=test_set.draw(300, seed=0),
                       tolerance=Tolerance(overall=0.05, per_class=0.2), strategy="subtract")
    assert report.actions == [f"subtracted {report.forget.steps_applied} steps"] and report.retrain_share == 0


def test_auto_fine_tunes_from_a_sparse_store_and_the_record_says_why(digits_run, tmp_path):
    model, store, train_set, test_set, forget_ids = _setup(digits_run, tmp_path)  # keep 0.1 < REPLAY_KEEP
    forget_ids = forget_ids[:40]
    report = pu.forget(model, store, forget_ids, probe=test_set.draw(300, seed=0),
                       retain_data=train_set.without(forget_ids), budget=0.6)
    assert report.repair == "fine-tune" and report.actions[1].startswith("fine-tuned")
    batches = store.step_ids(report.forget.subtracted)
    kept = sum(int((~np.isin(b, forget_ids.numpy())).sum()) for b in batches)
    assert report.shape == RequestShape(steps=report.forget.steps_applied, steps_recorded=store.steps,
                                        retained_share=kept / sum(b.size for b in batches), pure_steps=0,
                                        replay_cost=kept / store.samples, keep=0.1, replayable=kept)
    params = store.ledger.audit()[0]["params"]
    assert params["strategy"] == "auto" and params["repair"] == "fine-tune" and "keeps 0.1 of each update" in params["why"]
    assert f"replay_cost={report.shape.replay_cost:.4f}" in store.ledger.audit()[0]["guard"]["request"]


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    """Trained 2 epochs, recorded dense (keep 1.0, float32): the store replay is chosen from.
    Read-only for the tests: `_dense_setup` copies it."""
    return _recorded_digits(tmp_path_factory.mktemp("dense"), 2, keep=1.0, value_dtype="float32")


def _dense_setup(dense_run, tmp_path):
    return (*_copy_of(dense_run, tmp_path), *dense_run[2:])


def test_auto_replays_from_a_dense_store_when_the_replay_fits_the_budget(dense_run, tmp_path):
    model, store, train_set, test_set = _dense_setup(dense_run, tmp_path)
    first_batch = store.step_ids([0])[0]
    measured = RequestShape.measure(store, store.step_ids([0, 1]), first_batch)  # step 0 trained on them only
    assert measured.pure_steps == 1 and measured.retained_share == pytest.approx(32 / 64)
    assert measured.replay_cost == pytest.approx(32 / store.samples)
    forget_ids = train_set.ids[:16]  # about 30 of the 90 steps: the dense subtraction takes much of what they learnt
    probe, retained = test_set.draw(300, seed=0), train_set.without(forget_ids)
    report = pu.forget(model, store, forget_ids, probe=probe, retain_data=retained, budget=0.6)
    assert Tolerance().problems(report.before, report.after_subtraction)  # the subtraction had to be repaired
    assert report.shape.keep == 1.0 and 0 < report.shape.replay_cost <= 0.6
    assert report.repair == "replay" and report.actions[1].startswith(f"replayed {report.forget.steps_applied} steps")
    assert store.ledger.audit()[0]["params"]["repair"] == "replay"


def test_a_replay_reads_the_steps_batches_once(dense_run, tmp_path, monkeypatch):
    """The request's shape and the replay both need the subtracted steps' sample IDs: forget
    reads them from the store once and hands them to the replay."""
    model, store, train_set, test_set = _dense_setup(dense_run, tmp_path)
    reads = []
    read = pu.UpdateStore.step_ids
    monkeypatch.setattr(pu.UpdateStore, "step_ids", lambda self, steps: reads.append(len(steps)) or read(self, steps))
    forget_ids = train_set.ids[:16]
    report = pu.forget(model, store, forget_ids, probe=test_set.draw(300, seed=0),
                       retain_data=train_set.without(forget_ids), budget=0.6, strategy="replay")
    assert report.repair == "replay" and reads == [report.forget.steps_applied]
    store.close()


def test_retained_data_with_none_of_the_steps_samples_is_not_replayed(dense_run, tmp_path):
    """A replay finds each subtracted step's retained samples in retain_data by ID. IDs of
    another space (a store of keys given positions, say) find none: auto fine-tunes and says
    why, and an explicit replay is refused with the model and the store as they were. Before,
    the replay ran on nothing and the record said "replay"."""
    model, store, train_set, test_set = _dense_setup(dense_run, tmp_path)
    forget_ids = train_set.ids[:16]
    retained = train_set.without(forget_ids)
    elsewhere = data.SampleSet(retained.ids + 10**6, retained.x, retained.y)  # the same samples, other IDs
    probe = test_set.draw(300, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"^strategy='replay': retain_data holds none of the subtracted steps' "
                                         r"retained samples \(on a store of keys.*store.ids_for\(keys\).*restored"):
        pu.forget(model, store, forget_ids, probe=probe, retain_data=elsewhere, budget=0.6, strategy="replay")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert len(store.ledger) == 1 and store.forgotten_ids().size == 0

    report = pu.forget(model, store, forget_ids, probe=probe, retain_data=elsewhere, budget=0.6)
    assert report.shape.replayable == 0 and report.shape.replay_cost == 0 and report.shape.retained_share > 0
    assert report.repair == "fine-tune" and not any(a.startswith("replayed") for a in report.actions)
    record = store.ledger.audit()[0]
    assert record["params"]["why"].startswith("retain_data holds none of the subtracted steps' retained samples")
    assert "replayable=0" in record["guard"]["request"]
    store.close()


def test_an_asked_for_replay_of_steps_that_held_forgotten_samples_only_is_refused(tmp_path):
    """The last 10 steps trained on the forgotten samples alone (a deletion unit batched on its
    own), the earlier ones on the others: subtracting those steps leaves nothing to replay, so
    strategy="replay" is refused before any gradient is spent, and nothing changes."""
    train_set, test_set = data.split(data.digits(), 0.2, seed=0)
    unit = train_set.ids[:320]
    torch.manual_seed(0)
    model = DigitsCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    store = pu.UpdateStore.create(tmp_path / "unit.zarr", model, keep=1.0, value_dtype="float32")
    generator = torch.Generator().manual_seed(0)
    with pu.UpdateRecorder(model, optimizer, store) as rec:
        for part in (train_set.without(unit), train_set.without(unit), train_set.subset(torch.arange(320))):
            for ids, x, y in part.batches(32, generator=generator):
                rec.batch(ids)
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"^strategy='replay': the subtracted steps trained on forgotten samples only: "
                                         "nothing to replay. The model was restored and nothing was recorded"):
        pu.forget(model, store, unit, probe=test_set, retain_data=train_set.without(unit), strategy="replay",
                  tolerance=Tolerance(overall=0.0, per_class=0.0))  # any fall of the probe calls for the repair
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert len(store.ledger) == 1 and store.forgotten_ids().size == 0
    store.close()


def test_the_request_shape_counts_what_retain_data_can_replay(dense_run, tmp_path):
    _, store, train_set, _ = _dense_setup(dense_run, tmp_path)
    batches = store.step_ids([0, 1, 2])
    forgotten = batches[0][:5]
    some = np.concatenate([batches[1][:7], batches[2][:3], forgotten])  # a retained subset; forgotten IDs don't count
    shape = RequestShape.measure(store, batches, forgotten, some)
    assert shape.replayable == 10 and shape.replay_cost == pytest.approx(10 / store.samples)
    everything = RequestShape.measure(store, batches, forgotten)
    assert everything.replayable is None and everything.replay_cost == pytest.approx((96 - 5) / store.samples)
    assert shape.to_record()["replayable"] == "10" and "replayable" not in everything.to_record()
    with pytest.raises(TypeError, match="batches must be the list store.step_ids\\(steps\\) returns"):
        RequestShape.measure(store, np.array([0, 1, 2]), forgotten)  # step numbers, as measure took before
    store.close()


def test_the_auto_rule():
    shape = RequestShape(steps=10, steps_recorded=100, retained_share=0.9, pure_steps=0, replay_cost=0.09, keep=1.0)
    assert choose_repair(shape, budget=0.3)[0] == "replay"
    assert choose_repair(shape, budget=0.05) == ("fine-tune", "replaying the subtracted steps' retained samples would "
                                                              "cost 0.090 of a retrain, over the budget 0.05")
    sparse = RequestShape(10, 100, 0.9, 0, 0.09, keep=REPLAY_KEEP / 2)
    assert choose_repair(sparse, budget=0.3)[0] == "fine-tune" and "replaying whole steps" in choose_repair(sparse, 0.3)[1]
    pure = RequestShape(10, 100, 0.0, pure_steps=10, replay_cost=0.0, keep=1.0)
    assert choose_repair(pure, budget=0.3) == ("fine-tune", "the subtracted steps trained on forgotten samples only: "
                                                            "nothing to replay")
    unmatched = RequestShape(10, 100, 0.9, pure_steps=0, replay_cost=0.0, keep=1.0, replayable=0)
    assert choose_repair(unmatched, budget=0.3) == ("fine-tune", f"{NOTHING_TO_REPLAY}: nothing to replay")


def test_replay_first_when_asked(digits_run, tmp_path):
    model, store, train_set, test_set, forget_ids = _setup(digits_run, tmp_path)
    forget_ids = forget_ids[:14]
    report = pu.forget(model, store, forget_ids, probe=test_set.draw(300, seed=0), strategy="replay",
                       retain_data=train_set.without(forget_ids), budget=0.6)
    assert report.actions[1].startswith(f"replayed {report.forget.steps_applied} steps")


def test_the_membership_check_is_recorded_as_evidence(digits_run, tmp_path):
    model, store, train_set, test_set, forget_ids = _setup(digits_run, tmp_path)
    forget_ids = forget_ids[:40]
    forget_data = train_set.with_ids(forget_ids)
    report = pu.forget(model, store, forget_ids, probe=test_set.draw(200, seed=0),
                       retain_data=train_set.without(forget_ids), forget_data=forget_data,
                       held_out=test_set.draw(150, seed=1), budget=0.6)
    evidence = store.ledger.audit()[0]["evidence"]
    assert evidence == report.evidence and 0 <= float(evidence["auc_after"]) <= 1 and 0 <= float(evidence["p_after"]) <= 1
    assert evidence["forgotten"] == "40" and evidence["held_out"] == "150"


def test_the_membership_check_is_a_mann_whitney_test():
    """Against scipy's (the tests' reference; the library has its own few lines)."""
    from scipy.stats import mannwhitneyu

    class Fixed(torch.nn.Module):  # logits that give chosen losses: label 0, logit margin m
        def forward(self, x):
            return torch.cat([x, torch.zeros_like(x)], dim=1)

    gen = torch.Generator().manual_seed(0)
    members = pu.data.SampleSet(torch.arange(40), torch.randn(40, 1, generator=gen) + 1.0, torch.zeros(40, dtype=torch.long))
    others = pu.data.SampleSet(torch.arange(40, 100), torch.randn(60, 1, generator=gen), torch.zeros(60, dtype=torch.long))
    auc, p = _membership(Fixed(), members, others)
    losses = lambda s: torch.nn.functional.cross_entropy(Fixed()(s.x), s.y, reduction="none").numpy()  # noqa: E731
    reference = mannwhitneyu(losses(members), losses(others), alternative="two-sided", method="asymptotic",
                             use_continuity=False)
    assert p == pytest.approx(reference.pvalue, rel=1e-5)
    assert auc == pytest.approx(1 - reference.statistic / (40 * 60)) and auc > 0.5  # members sit lower


def test_the_tolerance_allows_a_small_probes_noise_and_exempts_forgotten_classes():
    before = pu.unlearn.ProbeScore(100, 0.95, 0.2, {0: (1.0, 10), 1: (0.9, 90)})
    after = pu.unlearn.ProbeScore(100, 0.95, 0.2, {0: (0.9, 10), 1: (0.85, 90)})
    tolerance = Tolerance(overall=0.01, per_class=0.03)
    # class 0: 10 samples, so one sample is 10 points: allowed 2·sqrt(1/10/10) ≈ 0.2; class 1: allowed 0.063
    assert tolerance.problems(before, after) == []
    worse = pu.unlearn.ProbeScore(100, 0.9, 0.3, {0: (0.9, 10), 1: (0.7, 90)})
    assert [p.split()[0] + " " + p.split()[1] for p in tolerance.problems(before, worse)] == ["accuracy 0.9500", "class 1"]
    assert tolerance.problems(before, worse, exempt={1}) == ["accuracy 0.9500 → 0.9000"]
    with pytest.raises(ValueError, match="Tolerance.per_class"):
        Tolerance(per_class=1.5)


def test_a_refusal_where_only_classes_fell_says_retraining_moves_classes_more():
    from pyunlearn.unlearn.guarded import _what_may_help

    retained = data.SampleSet(torch.arange(2), torch.zeros(2, 1), torch.zeros(2, dtype=torch.long))  # given, at all
    advice = _what_may_help(retained, "auto", [], False, Tolerance(per_class=0.05), 1000, True, 0.1)  # classes fell
    assert advice.startswith("Give a larger budget") and "--tolerance-per-class" in advice
    assert "(per class 0.05, or twice" in advice  # the tolerance the call used, not the default
    assert "--tolerance-per-class" not in _what_may_help(retained, "auto", [], True, Tolerance(), 1000, True, 0.1)
    # strategy="subtract" without retained data: both are needed for a repair
    assert _what_may_help(None, "subtract", [], True, Tolerance(), 1000, True, 0.1) == (
        "Let it repair (strategy='auto', --strategy auto, with retained data: retain_data, --retain), or retrain")


def test_a_refusal_where_not_one_repair_increment_fits_the_budget_says_so(digits_run, tmp_path):
    """An increment of one epoch of the retained data costs about a sixth of this recording's 6
    epochs, three times the budget 0.05: no repair can run, and the refusal says that, not
    only "a larger budget"."""
    model, store, train_set, test_set, forget_ids = _setup(digits_run, tmp_path)
    with pytest.raises(pu.GuardFailedError, match=r"fine-tuning increment \(step_epochs\) costs 3 times the budget: no "
                                                  "repair could run, so give a budget of at least one increment, or a "
                                                  "smaller step_epochs$") as refused:
        pu.forget(model, store, forget_ids, probe=test_set.draw(300, seed=0), retain_data=train_set.without(forget_ids),
                  budget=0.05, step_epochs=1.0)
    assert "fine-tuned" not in str(refused.value) and "dampen=False" not in str(refused.value)
    store.close()


def test_a_refusal_on_a_probe_too_small_for_the_overall_tolerance_says_so():
    """On a probe of 64 samples one changed prediction is 1.6 points, past the default overall
    tolerance of 1 point: the refusal says so, and what size would resolve it."""
    from pyunlearn.unlearn.guarded import _what_may_help

    retained = data.SampleSet(torch.arange(2), torch.zeros(2, 1), torch.zeros(2, dtype=torch.long))
    advice = _what_may_help(retained, "auto", [], True, Tolerance(), 64, True, 0.1)
    assert advice.endswith(". One sample of the probe is 1.6 points of its accuracy, more than the overall tolerance "
                           "(0.01): a probe of 64 samples refuses a request that changes one prediction. Give a larger "
                           "probe (over 100 samples), or loosen the tolerance (Tolerance(overall=...), "
                           "--tolerance-overall)")
    for quiet in (_what_may_help(retained, "auto", [], True, Tolerance(), 100, True, 0.1),  # one sample is the tolerance
                  _what_may_help(retained, "auto", [], False, Tolerance(), 64, True, 0.1),  # the overall held
                  _what_may_help(retained, "auto", [], True, Tolerance(overall=0.0), 64, True, 0.1)):  # no size resolves 0
        assert "larger probe" not in quiet


def test_the_tolerance_on_the_command_line(digits_run, tmp_path, capsys):
    """--tolerance-overall and --tolerance-per-class reach the guard; bad values and their use
    without --probe are refused before anything changes."""
    model, store, train_set, test_set, forget_ids = _setup(digits_run, tmp_path)
    store.close()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    probe = test_set.draw(300, seed=0)
    torch.save({"ids": probe.ids, "x": probe.x, "y": probe.y}, tmp_path / "probe.pt")
    np.save(tmp_path / "many.npy", forget_ids[:40].numpy())  # its subtraction collapses a class (the test below)
    np.save(tmp_path / "few.npy", forget_ids[:3].numpy())
    plain = ["forget", "--store", str(tmp_path / "s.zarr"), "--checkpoint", str(tmp_path / "model.pt"),
             "--out", str(tmp_path / "out.pt")]
    guard = ["--probe", str(tmp_path / "probe.pt"), "--model", "pyunlearn.models:DigitsCNN"]
    loose = ["--tolerance-overall", "0.98", "--tolerance-per-class", "0.99"]
    few = plain + ["--ids", str(tmp_path / "few.npy")]
    assert main(few + loose[:2]) == 1  # a tolerance without a probe: nothing to hold it to
    assert "--tolerance-overall takes part in guarded forgetting" in capsys.readouterr().err
    for bad in ("1", "-0.1", "lots"):
        with pytest.raises(SystemExit) as usage:
            main(few + guard + ["--tolerance-per-class", bad])
        assert usage.value.code == 2 and "--tolerance-per-class" in capsys.readouterr().err
    assert main(plain + ["--ids", str(tmp_path / "many.npy")] + guard + ["--tolerance-per-class", "0.5"]) == 1
    err = capsys.readouterr().err
    assert "not within the tolerance" in err and "(allowed 0.5000)" in err  # refused, held to the flag's value
    assert not (tmp_path / "out.pt").exists() and len(pu.UpdateStore.open(tmp_path / "s.zarr", mode="r").ledger) == 1
    assert main(few + guard + loose) == 0  # told that the probe may fall this far: the subtraction alone is kept
    assert "applied" in capsys.readouterr().out and (tmp_path / "out.pt").exists()
    reader = pu.UpdateStore.open(tmp_path / "s.zarr", mode="r")
    assert reader.ledger.audit()[-1]["guard"]["tolerance"] == "overall 0.98, per class 0.99"


def test_guarded_forget_on_the_command_line(digits_run, tmp_path, capsys):
    model, store, train_set, test_set, forget_ids = _setup(digits_run, tmp_path)
    store.close()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    probe = test_set.draw(300, seed=0)
    torch.save({"ids": probe.ids, "x": probe.x, "y": probe.y}, tmp_path / "probe.pt")
    forget_ids = forget_ids[:40]
    retain = train_set.without(forget_ids)
    torch.save({"ids": retain.ids, "x": retain.x, "y": retain.y}, tmp_path / "retain.pt")
    np.save(tmp_path / "ids.npy", forget_ids.numpy())
    args = ["forget", "--store", str(tmp_path / "s.zarr"), "--checkpoint", str(tmp_path / "model.pt"),
            "--ids", str(tmp_path / "ids.npy"), "--out", str(tmp_path / "out.pt"), "--probe", str(tmp_path / "probe.pt"),
            "--model", "pyunlearn.models:DigitsCNN"]
    assert main(args) == 1  # no retained data to repair with: refused, nothing written
    err = capsys.readouterr().err
    assert "not within the tolerance" in err and "--retain" in err and not (tmp_path / "out.pt").exists()
    retained = ["--retain", str(tmp_path / "retain.pt"), "--budget", "0.6"]
    assert main(args + retained + ["--strategy", "subtract"]) == 1  # repairs refused: as without retained data
    err = capsys.readouterr().err
    assert "not within the tolerance" in err and "--strategy auto" in err and not (tmp_path / "out.pt").exists()
    assert main(args + retained) == 0
    out = capsys.readouterr().out
    assert out.startswith("guard: subtracted") and "applied" in out
    repaired = DigitsCNN()
    repaired.load_state_dict(torch.load(tmp_path / "out.pt"))
    reader = pu.UpdateStore.open(tmp_path / "s.zarr", mode="r")
    assert [r.kind for r in reader.ledger.records] == ["segment", "deletion", "confirm"]
    assert reader.ledger.records[1].fields["fingerprint_after"] == pu.kernels.fingerprint(reader.check_model(repaired))


def test_the_command_lines_samples_by_ids_or_keys(digits_run, tmp_path, capsys):
    """A samples file names its samples by 'ids' or by 'keys' (mapped with the store's secret, as
    the recorder mapped them); keys on a store of integer IDs, or both, or neither, are refused
    with what the file must hold, before anything changes."""
    model, store, train_set, test_set, forget_ids = _setup(digits_run, tmp_path)
    store.close()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    probe = test_set.draw(100, seed=0)
    np.save(tmp_path / "ids.npy", forget_ids[:4].numpy())
    args = ["forget", "--store", str(tmp_path / "s.zarr"), "--checkpoint", str(tmp_path / "model.pt"),
            "--ids", str(tmp_path / "ids.npy"), "--out", str(tmp_path / "out.pt"), "--probe", str(tmp_path / "probe.pt"),
            "--model", "pyunlearn.models:DigitsCNN"]
    for fields, error in (({"keys": [f"k{i}" for i in range(100)]}, "--probe: .*recorded its samples by integer ID; keys cannot be matched"),
                          ({"ids": probe.ids, "keys": ["a"] * 100}, "either 'ids' .* or 'keys'"),
                          ({}, "either 'ids' .* or 'keys'")):
        torch.save({**fields, "x": probe.x, "y": probe.y}, tmp_path / "probe.pt")
        assert main(args) == 1
        assert re.search(error, capsys.readouterr().err)
        assert not (tmp_path / "out.pt").exists()
    assert len(pu.UpdateStore.open(tmp_path / "s.zarr", mode="r").ledger) == 1
