"""Generate small synthetic question/answer task families for Native Reasoning Training.

Usage (from the repository root):

    python data/make_tasks.py                  # writes data/<family>_{train,test}.jsonl for every family
    python data/make_tasks.py --families=multi_add,letters --seed=0

Families (see data/README.md for examples and counts):

    multi_add       chains of 3-4 one-digit numbers with + and -     "What is 7 + 2 - 4 + 5?"     -> "10"
    word_problems   two-step word problems with small numbers          "Tom has 5 apples. He buys ..." -> "6"
    count_kind      count the items of one kind in a short mixed list  "I have a carrot, two apples ..." -> "3"
    letters         first / last letter or length of a common word     'How many letters are in "house"?' -> "5"

Everything is a pure function of --seed (default 0): questions are drawn with random.Random(seed + family
offset), deduplicated, split into train/test by the sha1 of a split key, and each file is ordered by the sha1 of
the question (so the first k rows are an unbiased subset, as in the BIG-bench files). Re-running gives
byte-identical files. Row format, as data/extract_bigbench.py writes it:

    {"question": str, "answer": str, "aliases": [str, ...] (only when there are some), "task": str}
"""
import argparse
import hashlib
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_word(n):
    """English words for 0 <= n < 100 ("twenty-one")."""
    if n < 20:
        return ONES[n]
    return TENS[n // 10] + ("-" + ONES[n % 10] if n % 10 else "")


def number_row(question, value, task):
    """A row whose answer is a non-negative integer: the digits, and the word form as an alias."""
    return {"question": question, "answer": str(value), "aliases": [number_word(value)] if 0 <= value < 100 else [],
            "task": task}


def sha1_int(text):
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest(), 16)


# ---------------------------------------------------------------- multi_add

def multi_add(rng):
    """3 or 4 one-digit operands joined by + or -, the running total never negative (answers 0..36)."""
    n = rng.choice([3, 3, 4])
    values, ops = [rng.randint(1, 9)], []
    for _ in range(n - 1):
        total = sum(v if o == "+" else -v for v, o in zip(values, ["+"] + ops))
        op = rng.choice("+-") if total > 1 else "+"
        v = rng.randint(1, min(9, total)) if op == "-" else rng.randint(1, 9)
        ops.append(op)
        values.append(v)
    expr = str(values[0]) + "".join(f" {o} {v}" for o, v in zip(ops, values[1:]))
    answer = sum(v if o == "+" else -v for v, o in zip(values, ["+"] + ops))
    return number_row(f"What is {expr}?", answer, f"{n}_operands"), None


# ---------------------------------------------------------------- word_problems

NAMES = [("Tom", "he"), ("Anna", "she"), ("Ben", "he"), ("Lucy", "she"), ("Sam", "he"), ("Mia", "she"),
         ("Jack", "he"), ("Emma", "she"), ("Leo", "he"), ("Zoe", "she"), ("Max", "he"), ("Lily", "she"),
         ("Noah", "he"), ("Ella", "she"), ("Paul", "he"), ("Sara", "she"), ("Dan", "he"), ("Kate", "she"),
         ("Alex", "he"), ("Nina", "she")]
ITEMS = ["apples", "pencils", "books", "cookies", "marbles", "stickers", "cards", "balloons", "coins", "candies",
         "toy cars", "eggs", "flowers", "shells", "stamps", "oranges"]


def word_problem(rng):
    """One of five two-step templates; every number 1..9 and every answer in 1..30."""
    (name, he), (other, _) = rng.sample(NAMES, 2)
    He, item = he.capitalize(), rng.choice(ITEMS)
    kind = rng.choice(["buy_give", "eat_find", "groups", "more_than", "twice"])
    if kind == "buy_give":  # a + b - c
        a, b = rng.randint(2, 9), rng.randint(1, 9)
        c = rng.randint(1, min(9, a + b - 1))
        q = (f"{name} has {a} {item}. {He} buys {b} more and then gives {c} to {other}. "
             f"How many {item} does {name} have now?")
        ans = a + b - c
    elif kind == "eat_find":  # a - b + c
        a = rng.randint(2, 9)
        b, c = rng.randint(1, a - 1), rng.randint(1, 9)
        verb = "ate" if item in ("apples", "cookies", "candies", "oranges") else "lost"
        q = f"{name} had {a} {item} and {verb} {b}. Then {he} found {c} more. How many {item} does {name} have now?"
        ans = a - b + c
    elif kind == "groups":  # a * b
        a, b = rng.randint(2, 5), rng.randint(2, 6)
        q = f"{name} has {a} bags with {b} {item} in each bag. How many {item} does {name} have in total?"
        ans = a * b
    elif kind == "more_than":  # a + (a + b)
        a, b = rng.randint(1, 9), rng.randint(1, 6)
        q = f"{name} has {a} {item}. {other} has {b} more than {name}. How many {item} do they have together?"
        ans = a + a + b
    else:  # a + 2a
        a = rng.randint(1, 9)
        q = f"{name} has {a} {item}. {other} has twice as many. How many {item} do they have together?"
        ans = 3 * a
    return number_row(q, ans, kind), None


# ---------------------------------------------------------------- count_kind

KINDS = {
    "fruits": ["apple", "banana", "pear", "orange", "plum", "peach", "grape", "lemon", "mango", "cherry"],
    "vegetables": ["carrot", "potato", "onion", "cabbage", "tomato", "pepper", "cucumber", "leek", "turnip"],
    "animals": ["dog", "cat", "horse", "cow", "rabbit", "goat", "duck", "pig", "sheep", "mouse"],
    "instruments": ["guitar", "drum", "violin", "flute", "piano", "trumpet", "harp", "cello"],
}
PLURAL = {"cherry": "cherries", "potato": "potatoes", "tomato": "tomatoes", "mouse": "mice", "sheep": "sheep",
          "peach": "peaches"}
COUNT_WORDS = {1: None, 2: "two", 3: "three"}


def phrase(noun, count):
    if count == 1:
        return ("an " if noun[0] in "aeiou" else "a ") + noun
    return f"{COUNT_WORDS[count]} {PLURAL.get(noun, noun + 's')}"


def count_kind(rng):
    """4-5 distinct items (1-3 of each) from the asked kind and one distractor kind; ask for the asked kind."""
    asked, other = rng.sample(sorted(KINDS), 2)
    n_items = rng.choice([4, 5])
    n_asked = rng.randint(1, n_items - 1)
    nouns = rng.sample(KINDS[asked], n_asked) + rng.sample(KINDS[other], n_items - n_asked)
    rng.shuffle(nouns)
    counts = [rng.choice([1, 1, 2, 3]) for _ in nouns]
    parts = [phrase(n, c) for n, c in zip(nouns, counts)]
    answer = sum(c for n, c in zip(nouns, counts) if n in KINDS[asked])
    q = f"I have {', '.join(parts[:-1])} and {parts[-1]}. How many {asked} do I have?"
    return number_row(q, answer, asked), None


# ---------------------------------------------------------------- letters

# common English words, 3-9 letters, lower case (a repeat is dropped)
WORDS = """
bed bird boat book box boy bread bus cake car chair city clock cloud coat cold cup desk dog door dream
duck egg end eye face farm fish floor flower food foot fork friend frog game garden gift girl glass gold
green hand hat head heart hill home horse house ice jacket jump key king kite kitten knife lake lamp leg lemon
letter light lion lip list lock love lunch map milk money monkey moon morning mother mouse mouth music name
nest night nose note ocean office orange paper park party pen pencil pig pillow plane plant plate pocket
point pond queen rabbit rain river road rock roof room rope rose salt school sea seed sheep ship shirt shoe
shop sister sky smile snow sock song soup spoon spring star stone street sugar summer sun table tail teacher
tent thing tiger time tooth towel tower town toy train tree truck uncle wall water week wheel wind window
winter wolf wood word world yard year yellow zoo
bottle butter button candle carrot castle cheese cherry circle cookie corner cotton dinner doctor dragon
engine finger forest garlic ginger hammer honey island jelly kettle ladder market mirror needle number
onion orbit parrot people pepper picture planet pocket potato puzzle rocket saddle silver spider sponge
ticket tomato tunnel turtle velvet wallet winner wizard yogurt zipper
bishop blanket bridge brother bucket cabin camel canyon carpet cousin crayon desert dolphin eagle elbow
fabric feather fiddle flute fossil goblin goose helmet hockey insect jungle kernel lizard lobster magnet
meadow melon mitten muffin nickel noodle otter oyster peanut pebble penguin pirate pickle pillow pumpkin
rabbit raisin ribbon riddle robin salmon sandal secret shadow shovel shrimp signal sister skunk sleeve
spirit squid statue sunset switch thunder timber tongue trumpet tulip turkey vessel violin volcano walrus
weasel whistle wigwam window wrench
bench brick broom brush chalk cliff coin crown dress drum fence flag frost glove grape grass group harp
hedge hinge hook horn jeans juice kiosk knee knot lace leaf limb loft lung mask medal mint moss mule nail
nut oven owl pearl pipe plum prize pulse quilt quiz reef ring robe rug scarf screw shelf shell skirt slide
smoke snake stamp steam stick storm stove sword thumb torch tribe trunk vest whale wheat wrist
"""


def letters_rows(words):
    """Seven question types per word; the split key is the word, so test words never appear in train. A question
    whose reference would be the letter "a" is left out (normalize_answer drops "a" as an article)."""
    rows = []
    for w in words:
        rows.append((number_row(f'How many letters are in the word "{w}"?', len(w), "length"), w))
        rows.append((number_row(f'How many letters does the word "{w}" have?', len(w), "length"), w))
        for task, ordinal, letter in (("first_letter", "first", w[0]), ("second_letter", "second", w[1]),
                                      ("third_letter", "third", w[2]), ("last_letter", "last", w[-1])):
            if letter != "a":
                rows.append(({"question": f'What is the {ordinal} letter of the word "{w}"?', "answer": letter,
                              "task": task}, w))
        # the letter that occurs most often in the word (the earliest such letter on a tie)
        most = max(w, key=lambda c: (w.count(c), -w.index(c)))
        rows.append((number_row(f'How many times does the letter "{most}" appear in the word "{w}"?',
                                w.count(most), "letter_count"), w))
    return rows


# ---------------------------------------------------------------- generation, split, write

# family -> (draw one row (row, split key or None = the question), rows to draw, test share 1/N)
FAMILIES = {"multi_add": (multi_add, 4000, 7), "word_problems": (word_problem, 4000, 7),
            "count_kind": (count_kind, 4000, 7), "letters": (None, None, 6)}


def word_list():
    words = list(dict.fromkeys(WORDS.split()))  # keep the first of any repeat
    bad = [w for w in words if not w.isalpha() or not w.islower() or not 3 <= len(w) <= 9]
    assert not bad, f"word list: {bad}"
    return words


def family_rows(name, seed):
    """Unique (row, split key) pairs of one family, a pure function of (name, seed)."""
    draw, n, _ = FAMILIES[name]
    if draw is None:
        return letters_rows(word_list())
    rng = random.Random(f"{seed}:{name}")  # str seeds hash with sha512: stable across runs and platforms
    seen, out = set(), []
    attempts = 0
    while len(out) < n and attempts < 50 * n:
        attempts += 1
        row, key = draw(rng)
        if row["question"] not in seen:
            seen.add(row["question"])
            out.append((row, key or row["question"]))
    return out


def to_line(row):
    obj = {"question": row["question"], "answer": row["answer"]}
    if row.get("aliases"):
        obj["aliases"] = row["aliases"]
    obj["task"] = row["task"]
    return json.dumps(obj, ensure_ascii=False)


def split(name, pairs, seed):
    """(train, test): test when sha1(seed:key) % N == 0; each file ordered by sha1 of the question."""
    mod = FAMILIES[name][2]
    order = sorted(pairs, key=lambda p: (hashlib.sha1(p[0]["question"].encode("utf-8")).hexdigest(), p[0]["question"]))
    test = [r for r, key in order if sha1_int(f"{seed}:{key}") % mod == 0]
    train = [r for r, key in order if sha1_int(f"{seed}:{key}") % mod != 0]
    return train, test


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated, from: " + ", ".join(FAMILIES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out_dir", default=HERE)
    args = ap.parse_args()
    for name in filter(None, args.families.split(",")):
        if name not in FAMILIES:
            raise SystemExit(f"unknown family {name!r}; choose from {', '.join(FAMILIES)}")
        train, test = split(name, family_rows(name, args.seed), args.seed)
        for part, rows in (("train", train), ("test", test)):
            path = os.path.join(args.out_dir, f"{name}_{part}.jsonl")
            with open(path, "w", encoding="utf-8", newline="\n") as f:
                f.writelines(to_line(r) + "\n" for r in rows)
            print(f"{path}: {len(rows)} rows, {os.path.getsize(path):,} bytes")


if __name__ == "__main__":
    main()
