"""astrea_vlm.eval metrics: hand-worked values, the VQA normalisation rules, the box format, and the
captioning metrics against frozen pycocoevalcap values (no Java needed to run these tests)."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from astrea_vlm.eval import METRIC_NAMES, load_metric, metric_script
from astrea_vlm.geometry import box_iou, format_box, parse_boxes, pixel_to_normalised
from astrea_vlm.eval.caption_metrics import bleu, caption_scores, cider_d, cider_d_scores, rouge_l, tokenize
from astrea_vlm.eval.metrics import (
    exact_match,
    exact_match_score,
    grounding_accuracy,
    grounding_iou,
    image_text_retrieval,
    multiple_choice_accuracy,
    option_index,
    parse_choice,
    retrieval_ranks,
    retrieval_recall,
    vqa_accuracy,
    vqa_soft_accuracy,
)
from astrea_vlm.eval.normalize import normalize_text, normalize_vqa_answer


# ------------------------------------------------------------------------- VQA normalisation
@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("Yes", "yes"),
        ("The Dog", "dog"),  # lowercase, articles
        ("a red car", "red car"),
        ("an apple", "apple"),
        ("Two dogs.", "2 dogs"),  # number words, final period
        ("ten", "10"),
        ("None", "0"),
        ("100,978", "100978"),  # comma between digits: no space
        ("3.5", "3.5"),  # a decimal point stays
        (".5 cm", ".5 cm"),
        ("2:20 p.m.", "2:20 pm"),  # colons stay; periods go
        ("girl's hat", "girl's hat"),  # apostrophes stay
        ("dont", "don't"),  # missing apostrophes come back
        ("isnt it", "isn't it"),
        ("wouldnt've", "wouldn't've"),
        ("well", "well"),  # an ordinary word, not "we'll"
        ("t-shirt", "t shirt"),  # punctuation inside a word: a space
        ("yes, it is", "yes it is"),  # punctuation touching a space: deleted
        ("red/blue", "red blue"),
        ("  multiple\tspaces\nhere ", "multiple spaces here"),
        ("(left)", "left"),
        ("what?!", "what"),
    ],
)
def test_vqa_normalisation_rules(raw, normalised):
    assert normalize_vqa_answer(raw) == normalised


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab 12,.-'?/the", max_size=20))
def test_vqa_normalisation_is_idempotent(text):
    once = normalize_vqa_answer(text)
    assert normalize_vqa_answer(once) == once


# ---------------------------------------------------------------------------- VQA accuracy
def _brute_force_vqa(prediction, answers):
    """min(#matches / 3, 1) over every 9-answer subset, the literal definition."""
    pred = normalize_vqa_answer(prediction)
    subsets = list(itertools.combinations(answers, len(answers) - 1))
    return sum(min(1.0, sum(normalize_vqa_answer(a) == pred for a in s) / 3) for s in subsets) / len(subsets)


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_soft_accuracy_by_number_of_matching_humans(matches, expected):
    # m matches of 10: the m subsets that drop a match see m - 1, the 10 - m others see m.
    # m = 2: (2 * 1/3 + 8 * 2/3) / 10 = 0.6; m = 3: (3 * 2/3 + 7 * 1) / 10 = 0.9.
    answers = ["2"] * matches + ["3"] * (10 - matches)
    assert vqa_soft_accuracy("two", answers) == pytest.approx(expected)
    assert vqa_soft_accuracy("two", answers) == pytest.approx(_brute_force_vqa("two", answers))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["yes", "Yes.", "no", "2", "two", "the cat", "cat"]), min_size=10, max_size=10),
       st.sampled_from(["yes", "no", "2", "cat"]))
def test_vqa_soft_accuracy_equals_the_subset_definition(answers, prediction):
    assert vqa_soft_accuracy(prediction, answers) == pytest.approx(_brute_force_vqa(prediction, answers))


def test_vqa_accuracy_normalises_both_sides_and_averages():
    answers = ["Two"] * 3 + ["three"] * 7
    assert vqa_soft_accuracy("2.", answers) == pytest.approx(0.9)
    assert vqa_soft_accuracy("The Three", answers) == pytest.approx(1.0)
    assert vqa_soft_accuracy("yes", ["Yes"]) == 1.0  # a single answer: exact match
    assert vqa_accuracy(["2", "4"], [answers, answers]) == pytest.approx(0.45)
    with pytest.raises(ValueError, match="at least one"):
        vqa_soft_accuracy("x", [])
    with pytest.raises(ValueError, match="2 predictions but 1"):
        vqa_accuracy(["a", "b"], [["a"]])


# ------------------------------------------------------------------------------ exact match
def test_exact_match():
    assert normalize_text("  The  Cat. ") == "the cat"
    assert exact_match_score("Yes.", "yes") == 1.0
    assert exact_match_score("yes sir", "yes") == 0.0
    assert exact_match_score("Paris", ["London", "paris"]) == 1.0
    assert exact_match(["a", "b", "c", "d"], ["a", "x", ["C"], "d!"]) == 0.75


# -------------------------------------------------------------------------- multiple choice
OPTIONS = ["dog", "cat", "red car"]


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("B", 1), ("B.", 1), ("(B)", 1), ("B) cat", 1), ("[C]", 2), ("c", 2), ("b.", 1),
        ("The answer is C", 2), ("Answer: (A)", 0), ("option B", 1),
        ("cat", 1), ("Dog.", 0), ("a red car", 2), ("A cat", 1),  # "A" here is an article
        ("I think it is a cat.", 1),
        ("the cat or the dog", None), ("D", None), ("no idea", None), ("", None),
    ],
)
def test_parse_choice(prediction, expected):
    assert parse_choice(prediction, OPTIONS) == expected


def test_multiple_choice_accuracy_accepts_letters_indices_and_texts():
    assert option_index("b", OPTIONS) == 1 and option_index(2, OPTIONS) == 2 and option_index("Red car", OPTIONS) == 2
    with pytest.raises(ValueError, match="neither an option letter"):
        option_index("horse", OPTIONS)
    predictions = ["B", "cat", "A", "nothing"]
    references = ["B", 1, "cat", "A"]
    assert multiple_choice_accuracy(predictions, references, [OPTIONS] * 4) == 0.5


# -------------------------------------------------------------------------------- boxes
def test_format_box_rounds_half_up_and_clamps():
    assert format_box((0.0625, 0.25, 0.5, 1.0)) == "[63, 250, 500, 1000]"  # 62.5 -> 63
    assert format_box((0.0, 0.1234, 0.9994, 0.5)) == "[0, 123, 999, 500]"
    assert format_box((-0.2, 0.0, 1.3, 0.4)) == "[0, 0, 1000, 400]"
    with pytest.raises(ValueError, match="x1 <= x2"):
        format_box((0.5, 0.0, 0.4, 1.0))
    with pytest.raises(ValueError, match="four finite"):
        format_box((0.1, 0.2, 0.3))


def test_parse_boxes_reads_the_documented_format_only():
    text = "It is at [63, 250, 500, 1000]; also [ 0,0 , 10,20 ] but not [500, 0, 100, 10], [0, 0, 1001, 5], [0.1, 0.2, 0.3, 0.4] or [1, 2, 3]."
    assert parse_boxes(text) == [(0.063, 0.25, 0.5, 1.0), (0.0, 0.0, 0.01, 0.02)]
    assert parse_boxes("no box") == []
    assert pixel_to_normalised((10, 20, 30, 40), 100, 200) == (0.1, 0.1, 0.3, 0.2)


@given(st.lists(st.integers(0, 1000), min_size=4, max_size=4))
def test_format_and_parse_are_inverse_on_the_grid(values):
    x1, x2 = sorted(values[::2])
    y1, y2 = sorted(values[1::2])
    text = f"[{x1}, {y1}, {x2}, {y2}]"
    assert format_box(parse_boxes(text)[0]) == text


def test_grounding_accuracy_needs_iou_above_one_half():
    gt = (0.0, 0.0, 1.0, 1.0)
    assert box_iou((0, 0, 0.5, 0.5), (0.25, 0.25, 0.75, 0.75)) == pytest.approx(0.0625 / 0.4375)
    assert grounding_iou("[0, 0, 1000, 500]", gt) == pytest.approx(0.5)
    assert grounding_iou("box: [0, 0, 1000, 600] then [0, 0, 10, 10]", gt) == pytest.approx(0.6)  # the first box counts
    assert grounding_iou("no box", gt) == 0.0
    predictions = ["[0, 0, 1000, 500]", "[0, 0, 1000, 600]", "nothing", "[0, 0, 1000, 1000]"]
    assert grounding_accuracy(predictions, [gt] * 4) == 0.5  # IoU 0.5 is not > 0.5


# ---------------------------------------------------------------------------- retrieval
def test_retrieval_recall_hand_worked():
    similarity = [
        [0.9, 0.1, 0.3, 0.0],  # positive 0 ranked 1
        [0.8, 0.2, 0.7, 0.9],  # positive 1 ranked 4
        [0.5, 0.5, 0.5, 0.1],  # positive 2 tied with 0 and 1: lower index first -> rank 3
    ]
    assert retrieval_ranks(similarity, [0, 1, 2]) == [1, 4, 3]
    assert retrieval_recall(similarity, [0, 1, 2], ks=(1, 3, 5)) == {"recall@1": 1 / 3, "recall@3": 2 / 3, "recall@5": 1.0}
    # Several positives: the best-ranked one counts.
    assert retrieval_ranks(similarity, [[0], [1, 2], [2]]) == [1, 3, 3]
    assert retrieval_ranks([[0.1, 0.9], [0.3, 0.2]]) == [2, 2]  # default: the diagonal
    with pytest.raises(ValueError, match="positives"):
        retrieval_ranks(similarity, [0, 1, 7])


def test_image_text_retrieval_both_directions():
    # 2 images x 4 texts; texts 0, 1 describe image 0 and texts 2, 3 image 1.
    similarity = [[0.9, 0.1, 0.8, 0.2], [0.3, 0.4, 0.5, 0.6]]
    scores = image_text_retrieval(similarity, [0, 0, 1, 1], ks=(1, 2))
    # i2t: image 0's best text is 0 (hit@1); image 1's best is text 3 (hit@1).
    assert scores["i2t_recall@1"] == 1.0 and scores["i2t_recall@2"] == 1.0
    # t2i: text 0 -> image 0 (0.9 > 0.3) hit; text 1 -> image 1 first (0.4 > 0.1) miss@1;
    # text 2 -> image 0 first (0.8 > 0.5) miss@1; text 3 -> image 1 hit.
    assert scores["t2i_recall@1"] == 0.5 and scores["t2i_recall@2"] == 1.0


# ------------------------------------------------------------------------------ captioning
def test_caption_metrics_hand_worked():
    # ROUGE-L: LCS("a b c d", "a c d e f") = 3, P = 3/4, R = 3/5,
    # F = (1 + 1.2^2) P R / (R + 1.2^2 P) = 2.44 * 0.45 / 1.68.
    assert rouge_l(["a b c d"], [["a c d e f"]], tokenize=False) == pytest.approx(2.44 * 0.45 / 1.68)
    # BLEU of a candidate identical to its reference is 1.
    assert bleu(["the cat sat on the mat"], [["the cat sat on the mat"]])[3] == pytest.approx(1.0)
    # BLEU-1 with a brevity penalty: "a dog" vs "a dog runs": p1 = 1, BP = exp(1 - 3/2).
    assert bleu(["a dog"], [["a dog runs"]])[0] == pytest.approx(math.exp(-0.5))
    # CIDEr-D, two images whose candidates equal their single references: every n-gram has df 1,
    # IDF log 2; unigram and bigram cosines are 1, 3- and 4-grams do not exist (0), so each image
    # scores 10 * (1 + 1 + 0 + 0) / 4 = 5.
    assert cider_d_scores(["a b", "c d"], [["a b"], ["c d"]]) == pytest.approx([5.0, 5.0])
    # One image: IDF = log(1) - log(1) = 0 for every n-gram, so CIDEr-D is 0.
    assert cider_d(["a b"], [["a b"]]) == 0.0
    with pytest.raises(ValueError, match="at least one reference"):
        caption_scores(["x"], [[]])


def test_tokenizer_matches_the_ptb_tokeniser_of_pycocoevalcap():
    for case in COCO_CASES.values():
        assert [" ".join(tokenize(p)) for p in case["predictions"]] == case["ptb_predictions"]
        assert [[" ".join(tokenize(r)) for r in refs] for refs in case["references"]] == case["ptb_references"]


@pytest.mark.parametrize("name", ["coco_like", "edge", "tokenizer", "short_single_ref"])
def test_caption_metrics_equal_pycocoevalcap(name):
    case = COCO_CASES[name]
    ours = caption_scores(case["ptb_predictions"], case["ptb_references"], tokenize=False)
    for key, expected in case["expected"].items():
        assert ours[key] == pytest.approx(expected, rel=1e-9, abs=1e-12), key
    # From raw captions, with our tokeniser, the same numbers.
    raw = caption_scores(case["predictions"], case["references"])
    assert raw == pytest.approx(ours, rel=1e-12)


# ------------------------------------------------------------------------ evaluate modules
@pytest.fixture(scope="module")
def metrics():
    return {name: load_metric(name, keep_in_memory=True) for name in METRIC_NAMES}


def test_metric_scripts_are_shipped_in_the_package():
    for name in METRIC_NAMES:
        assert metric_script(name).is_file()
    with pytest.raises(ValueError, match="unknown metric"):
        metric_script("bleurt")


def test_evaluate_modules_give_the_plain_function_values(metrics):
    answers = ["2"] * 3 + ["3"] * 7
    assert metrics["vqa_accuracy"].compute(predictions=["two", "3"], references=[answers, answers]) == {"vqa_accuracy": pytest.approx(0.95)}
    assert metrics["exact_match"].compute(predictions=["Yes.", "no"], references=["yes", "yes"]) == {"exact_match": 0.5}
    assert metrics["exact_match"].compute(predictions=["Yes.", "no"], references=[["y", "yes"], ["no"]]) == {"exact_match": 1.0}
    mc = metrics["multiple_choice"].compute(predictions=["B", "cat", "x"], references=["B", "A", "dog"], options=[OPTIONS, ["cat", "dog"], OPTIONS])
    assert mc == {"accuracy": pytest.approx(2 / 3)}
    grounding = metrics["grounding_accuracy"].compute(predictions=["[0, 0, 1000, 600]", "[0, 0, 1000, 500]"], references=[[0, 0, 1, 1]] * 2)
    assert grounding == {"accuracy": 0.5, "mean_iou": pytest.approx(0.55)}
    case = COCO_CASES["coco_like"]
    assert metrics["caption"].compute(predictions=case["predictions"], references=case["references"]) == pytest.approx(case["expected"], rel=1e-9)
    recall = metrics["retrieval_recall"].compute(predictions=[[0.9, 0.1, 0.3, 0.0], [0.8, 0.2, 0.7, 0.9]], references=[[0], [1]], ks=[1, 4])
    assert recall == {"recall@1": 0.5, "recall@4": 1.0}


# --------------------------------------------------------------- frozen pycocoevalcap values
# Obtained once during development with pycocoevalcap 1.2 (Java 17): the raw captions went through
# its PTBTokenizer (giving ptb_predictions / ptb_references), then Bleu(4), Rouge() and Cider()
# .compute_score on those tokenised captions gave `expected`. The tests only need these constants.
COCO_CASES = {'coco_like': {'predictions': ['A man riding a wave on top of a surfboard.',
                               'Two dogs are playing with a frisbee in the park.',
                               'A plate of food with broccoli and rice.',
                               'A red double-decker bus driving down the street.',
                               'A cat sitting on a laptop keyboard.',
                               'People standing around a kitchen counter.'],
               'references': [['A surfer rides a large wave in the ocean.',
                               'A man on a surfboard riding a wave.',
                               'Surfer riding the crest of a wave on his board.',
                               'A person surfing on a big wave.',
                               'A man is surfing in the ocean on a sunny day.'],
                              ['Two dogs chase a frisbee across the grass.',
                               'A pair of dogs playing in a park with a frisbee.',
                               'Dogs running on the grass after a toy.',
                               'Two brown dogs are playing together outside.',
                               'The dogs are playing frisbee in the park.'],
                              ['A plate with rice, broccoli and chicken.',
                               'A white plate topped with food and vegetables.',
                               'Broccoli and rice served on a dish.',
                               'A healthy meal of chicken, rice and broccoli.',
                               'Food on a plate on a wooden table.'],
                              ['A red bus drives along a city street.',
                               'A double decker bus on the road.',
                               'The red double-decker bus is driving past buildings.',
                               'A large red bus traveling down a street.',
                               'A bus full of people in London.'],
                              ['A cat lying on the keyboard of a laptop.',
                               'A grey cat sits on a computer.',
                               'The cat is sleeping on the laptop.',
                               'A kitten on top of an open laptop computer.',
                               'A cat that is sitting on a keyboard.'],
                              ['A group of people in a kitchen.',
                               'People are preparing food at the counter.',
                               'Several people standing in a kitchen talking.',
                               'Friends gather around the kitchen island.',
                               'A family cooking dinner together in the kitchen.']],
               'ptb_predictions': ['a man riding a wave on top of a surfboard',
                                   'two dogs are playing with a frisbee in the park',
                                   'a plate of food with broccoli and rice',
                                   'a red double-decker bus driving down the street',
                                   'a cat sitting on a laptop keyboard',
                                   'people standing around a kitchen counter'],
               'ptb_references': [['a surfer rides a large wave in the ocean',
                                   'a man on a surfboard riding a wave',
                                   'surfer riding the crest of a wave on his board',
                                   'a person surfing on a big wave',
                                   'a man is surfing in the ocean on a sunny day'],
                                  ['two dogs chase a frisbee across the grass',
                                   'a pair of dogs playing in a park with a frisbee',
                                   'dogs running on the grass after a toy',
                                   'two brown dogs are playing together outside',
                                   'the dogs are playing frisbee in the park'],
                                  ['a plate with rice broccoli and chicken',
                                   'a white plate topped with food and vegetables',
                                   'broccoli and rice served on a dish',
                                   'a healthy meal of chicken rice and broccoli',
                                   'food on a plate on a wooden table'],
                                  ['a red bus drives along a city street',
                                   'a double decker bus on the road',
                                   'the red double-decker bus is driving past buildings',
                                   'a large red bus traveling down a street',
                                   'a bus full of people in london'],
                                  ['a cat lying on the keyboard of a laptop',
                                   'a grey cat sits on a computer',
                                   'the cat is sleeping on the laptop',
                                   'a kitten on top of an open laptop computer',
                                   'a cat that is sitting on a keyboard'],
                                  ['a group of people in a kitchen',
                                   'people are preparing food at the counter',
                                   'several people standing in a kitchen talking',
                                   'friends gather around the kitchen island',
                                   'a family cooking dinner together in the kitchen']],
               'expected': {'bleu_1': 0.959802782511392,
                            'bleu_2': 0.754070362965754,
                            'bleu_3': 0.5136498027325737,
                            'bleu_4': 0.25582567730548267,
                            'rouge_l': 0.6763059151649188,
                            'cider_d': 1.7078169995267036}},
 'edge': {'predictions': ['a dog', 'the the the the', "an orange cat doesn't sleep on the sofa's arm", ''],
          'references': [['a dog runs', 'a brown dog'],
                         ['a bird on a wire'],
                         ['an orange cat sleeping on the arm of a sofa', "the cat doesn't move"],
                         ['nothing here']],
          'ptb_predictions': ['a dog', 'the the the the', "an orange cat does n't sleep on the sofa 's arm", ''],
          'ptb_references': [['a dog runs', 'a brown dog'],
                             ['a bird on a wire'],
                             ['an orange cat sleeping on the arm of a sofa', "the cat does n't move"],
                             ['nothing here']],
          'expected': {'bleu_1': 0.5423798679746024,
                       'bleu_2': 0.4414111370940706,
                       'bleu_3': 0.3096667386664704,
                       'bleu_4': 4.078028364253219e-05,
                       'rouge_l': 0.3371324628725207,
                       'cider_d': 1.2033567008546036}},
 'tokenizer': {'predictions': ["I can't go -- it's 3.5 p.m... (really)!",
                               "a [red] {car} & a dog/cat o'clock",
                               'He said "hi" to the U.S. team\'s coach; ok?',
                               "cannot won't isn't 100,000 dollars $5 50%"],
               'references': [['I cannot go, it is late.'],
                              ['A red car and a dog.'],
                              ['He greets the coach.'],
                              ["Won't pay 100,000 dollars."]],
               'ptb_predictions': ["i ca n't go it 's 3.5 p.m. -lrb- really -rrb-",
                                   "a -lsb- red -rsb- -lcb- car -rcb- & a dog/cat o'clock",
                                   "he said hi to the u.s. team 's coach ok",
                                   "can not wo n't is n't 100,000 dollars $ 5 50 %"],
               'ptb_references': [['i can not go it is late'],
                                  ['a red car and a dog'],
                                  ['he greets the coach'],
                                  ["wo n't pay 100,000 dollars"]],
               'expected': {'bleu_1': 0.31818181817458685,
                            'bleu_2': 0.1544785951596448,
                            'bleu_3': 8.719228127908283e-07,
                            'bleu_4': 2.133393835558072e-09,
                            'rouge_l': 0.45424848136071744,
                            'cider_d': 0.9220819010205861}},
 'short_single_ref': {'predictions': ['a dog', 'a small cat on a mat', 'birds'],
                      'references': [['a dog runs across the green field'],
                                     ['a small cat sits on a red mat'],
                                     ['two birds fly over the sea']],
                      'ptb_predictions': ['a dog', 'a small cat on a mat', 'birds'],
                      'ptb_references': [['a dog runs across the green field'],
                                         ['a small cat sits on a red mat'],
                                         ['two birds fly over the sea']],
                      'expected': {'bleu_1': 0.26359713805714974,
                                   'bleu_2': 0.215226161960018,
                                   'bleu_3': 0.14506309547085475,
                                   'bleu_4': 2.2757395877974366e-05,
                                   'rouge_l': 0.49756732716165336,
                                   'cider_d': 1.9911655184477561}}}
