"""Task data: deterministic by seed, evidence where the document says it is."""
import re

from pipeline.evaluate.tasks import utils

META = {"seed": 5, "context_lengths": [512, 1024], "distances": [0.1, 0.9], "episodes_per_cell": 2}


def test_generators_are_deterministic_by_seed():
    for task in utils.NEEDLE_TASKS + utils.PASSAGE_TASKS:
        a = utils.make(task, **META)["test"].to_list()
        b = utils.make(task, **META)["test"].to_list()
        c = utils.make(task, **{**META, "seed": 6})["test"].to_list()
        assert a == b, task
        assert [d["prompt"] for d in a] != [d["prompt"] for d in c], task


def test_needle_evidence_distance_and_choices():
    for task in utils.NEEDLE_TASKS:
        docs = utils.make(task, **META)["test"].to_list()
        assert len(docs) == 2 * 2 * 2
        for d in docs:
            assert abs(len(d["prompt"]) - d["context_len"]) <= 2
            answer_at = d["prompt"].rfind(d["answer"], 0, len(d["prompt"]) - 60)
            assert answer_at >= 0, d["id"]
            assert d["choices"][d["label"]] == d["answer"] and len(set(d["choices"])) == len(d["choices"])
        near = [d["distance"] for d in docs if d["id"].split("-")[2] == "0.1"]
        far = [d["distance"] for d in docs if d["id"].split("-")[2] == "0.9"]
        assert max(near) < min(far)  # 0.1 of the context vs 0.9: far evidence is far


def test_passage_retrieval_target_holds_the_quote():
    for d in utils.make("passage_retrieval", **META)["test"].to_list():
        quote = re.search(r'contains "(.*)"\?', d["prompt"]).group(1)
        target = re.search(rf"Paragraph {d['answer']}: (.*)\n", d["prompt"]).group(1)
        assert quote in target
        tail = d["prompt"][d["prompt"].index(target) + len(target):]
        assert d["distance"] == len(tail) - 0 or abs(d["distance"] - len(tail)) <= 1


def test_passage_count_answer_is_the_unique_count():
    for d in utils.make("passage_count", **META)["test"].to_list():
        paragraphs = re.findall(r"Paragraph \d+: (.*)\n", d["prompt"])
        assert str(len(set(paragraphs))) == d["answer"]


def test_longbench_scores():
    retrieval = lambda pred, answer: utils.process_passage_retrieval({"answer": answer}, [pred])  # noqa: E731
    count = lambda pred, answer: utils.process_passage_count({"answer": answer}, [pred])  # noqa: E731
    assert retrieval("Paragraph 3, I think 3", "3")["retrieval_score"] == 1.0
    assert retrieval("2 or 3", "3")["retrieval_score"] == 0.5
    assert count("none", "4")["count_score"] == 0.0
    assert count("4 of them", "4") == {"count_score": 1.0, "exact_match": 1.0}
    assert utils.exact_match(" 12345.", "12345") == 1.0 and utils.exact_match("123456", "12345") == 0.0
