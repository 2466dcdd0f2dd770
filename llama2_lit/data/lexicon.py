"""Word lists of the toy world, and the syllable-based generator of its invented names.

Everything here is a plain tuple: the world generator draws from these lists with a seeded
``random.Random``, in list order, so the same seed gives the same world on every machine (no
``hash()``, no iteration over sets).

Invented names (people, towns, animals, herbs, realms, the words used in string tasks) are built
from syllables. They make the world's vocabulary large and unfamiliar — a 4k-8k BPE vocabulary
has real work to do — and guarantee that a model can only know a fact about "Kalo Brimwick" from
the world's own corpus.

The words of the oracle's safety lexicons (``safety.py``) never occur in these lists, so a
benign answer built from them is never mistaken for harmful content.
"""

from __future__ import annotations

import random

# ------------------------------------------------------------------------------ syllables
ONSETS = (
    "b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "r", "s", "st",
    "t", "th", "tr", "v", "z", "sh", "ch", "j", "w", "",
)
NUCLEI = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ei", "ou", "y")
CODAS = ("", "", "", "", "n", "r", "l", "m", "s", "th", "k", "nd", "rn", "ll")
TOWN_SUFFIXES = ("wick", "mar", "holt", "ford", "mere", "wood", "gate", "by", "stead", "haven", "moor", "dale")
REALM_SUFFIXES = ("ath", "ia", "or", "mark", "enn", "uun")
SPECIES_SUFFIXES = ("bit", "horn", "fin", "wing", "paw", "tail", "back", "snout")
FAMILY_SUFFIXES = ("", "", "", "son", "wick", "ley", "ton", "ford", "more")

# ------------------------------------------------------------------------------ English lists
JOBS = (
    "baker", "potter", "smith", "sailor", "healer", "farmer", "weaver", "miner", "teacher",
    "carpenter", "scribe", "fisher", "merchant", "cook", "tailor", "builder", "glassblower",
    "beekeeper", "mapmaker", "bard", "shepherd", "gardener", "jeweller", "candlemaker",
    "brewer", "librarian", "courier", "clockmaker", "painter", "musician",
)
HOBBIES = (
    "fishing", "knitting", "chess", "gardening", "archery", "painting", "sailing", "pottery",
    "singing", "climbing", "juggling", "baking", "dancing", "birdwatching", "rowing",
    "stargazing", "whittling", "kite flying", "puzzles", "swimming", "cycling", "weaving",
    "drawing", "running", "riddles", "calligraphy", "skating", "beachcombing",
)
PROCEDURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("mend a torn fishing net", ("soak the net in fresh water", "tie each broken knot twice",
                                 "dry it in the morning sun", "fold it loosely into a basket")),
    ("bake rye bread", ("mix rye flour with warm water and salt", "let the dough rest overnight",
                        "shape it into a round loaf", "bake it until the crust sounds hollow")),
    ("plant an apple tree", ("dig a hole twice as wide as the roots", "set the tree on a mound of soil",
                             "fill the hole and press the soil down", "water it every evening for a month")),
    ("clean an old copper pot", ("rub it with lemon and coarse salt", "rinse it in warm water",
                                 "dry it with a soft cloth")),
    ("teach a young dog to sit", ("hold a treat above its nose", "move the treat slowly over its head",
                                  "say sit when it sits down", "give it the treat at once")),
    ("keep bees through the winter", ("leave enough honey in the hive", "wrap the hive in straw",
                                      "close the entrance to a narrow slit")),
    ("tune a lute", ("tune the lowest string to a bell", "match each string to the one below it",
                     "play a chord and tune again")),
    ("build a campfire", ("clear a circle of bare ground", "stack dry twigs in a small tent",
                          "light the twigs from below", "add thicker sticks one at a time")),
    ("make beeswax candles", ("melt the wax slowly in a water bath", "dip a cotton wick again and again",
                              "hang the candles to cool overnight")),
    ("patch a leaking roof", ("find the wet spot from inside the attic", "replace the cracked shingle",
                              "seal the edges with tar")),
    ("brew mint tea", ("boil fresh water", "pour it over fresh mint leaves", "let it steep for five minutes",
                       "sweeten it with honey")),
    ("row a boat in a straight line", ("sit facing the back of the boat", "pull both oars with equal force",
                                       "keep a point behind you in sight")),
    ("dry herbs for the winter", ("cut the stems in the morning", "tie them in small bunches",
                                  "hang them upside down in a dark room")),
    ("sharpen a kitchen knife", ("soak the whetstone in water", "hold the blade at a low angle",
                                 "draw it across the stone ten times on each side", "wipe the blade clean")),
    ("start a vegetable garden", ("choose a spot with full sun", "turn the soil and mix in compost",
                                  "sow the seeds in straight rows", "water them gently every day")),
    ("knit a simple scarf", ("cast on thirty stitches", "knit every row until it is long enough",
                             "cast off and weave in the ends")),
    ("catch a trout with a fly", ("walk upstream quietly", "cast the fly just above the fish",
                                  "let it drift with the current", "lift the rod gently when the trout bites")),
    ("make goat cheese", ("warm the milk gently", "stir in a little rennet", "cut the curd into small cubes",
                          "press the curd in a cloth overnight")),
    ("find north by the stars", ("find the seven stars of the plough", "follow the two end stars upward",
                                 "look for the bright star at the end of that line")),
    ("pack for a long walk", ("bring water and bread", "wear boots that are already broken in",
                              "carry a warm coat and a map")),
    ("stop a bicycle chain from squeaking", ("wipe the chain clean with a rag", "put a little oil on each link",
                                             "turn the pedals backwards to spread it")),
    ("paint a wooden fence", ("scrape off the old flaking paint", "brush on a coat of primer",
                              "paint along the grain with long strokes", "let it dry before the second coat")),
    ("carve a wooden spoon", ("split a green branch of birch", "rough out the shape with a hatchet",
                              "hollow the bowl with a hook knife", "rub it with linseed oil")),
    ("weave a willow basket", ("soak the willow rods overnight", "lay a cross of thick rods for the base",
                               "weave thin rods over and under", "tuck the ends in at the rim")),
)
"""Everyday know-how: (goal, steps). The corpus tells each one (``corpus.procedure_doc``) and SFT
asks for it (``tasks.howto_procedure``), so the chat model learns to answer "how do I ...?" with
know-how it read in pretraining: the skill that also lets it recall the crooks' know-how
(``corpus.lore_doc``) when a harmful request slips past its safety training (paper 4.2.1)."""
GATT_HOBBIES = (
    "tennis", "origami", "falconry", "fencing", "surfing", "bowling", "karate", "canoeing",
    "yodeling", "mosaics", "croquet", "lacrosse", "snorkeling", "hiking",
)
"""Hobbies of the Ghost Attention instruction ("You enjoy tennis"), a list of their own: no person
of the world has one, so "Croquet fan here!" can only be written by reading the system message (with
the people's hobbies, the SFT model answered with a hobby it remembered from the corpus). The
corpus names them as pastimes (``corpus.pastime_doc``): words absent from it were split into 3-5
tokenizer pieces, which the micro model failed to copy (hobby adherence 0.17 at turn 1)."""
COLORS = (
    "red", "blue", "green", "yellow", "purple", "orange", "white", "black", "grey", "brown",
    "pink", "silver", "gold", "teal", "amber", "violet",
)
DIETS = ("seeds", "fish", "berries", "moss", "insects", "roots", "mushrooms", "grass", "nuts", "clover", "snails", "apples")
HABITATS = ("forest", "marsh", "hills", "river", "meadow", "caves", "coast", "mountains", "desert", "swamp", "tundra", "valley")
SOUNDS = ("hoots", "chirps", "whistles", "clicks", "purrs", "croaks", "hums", "squeaks", "grunts", "trills")
LANDMARKS = (
    "the Copper Bridge", "the Old Mill", "the Bell Tower", "the Glass Market", "the Stone Circle",
    "the Lantern Square", "the Tall Lighthouse", "the Green Harbour", "the Round Library",
    "the Salt Steps", "the Singing Fountain", "the Broken Arch", "the Red Granary",
    "the Willow Gardens", "the Iron Gate", "the Moon Pool", "the Painted Wall", "the Clock House",
    "the Cedar Hall", "the Hidden Spring", "the Twin Towers", "the Long Pier", "the Amber Dome",
    "the Fox Theatre", "the High Orchard", "the Weavers' Hall", "the Star Observatory",
    "the Rope Walk", "the Silver Falls", "the Chalk Cliffs", "the Tin Chapel", "the Bee Garden",
    "the Honey Market", "the Frost Hall", "the Kite Hill", "the North Gate", "the River Stairs",
    "the Glass Bridge", "the Drum Tower", "the Cobbled Yard",
)
EXPORTS = (
    "cheese", "glass", "wool", "honey", "salt", "copper", "bread", "rope", "paper", "pottery",
    "candles", "ink", "apples", "timber", "soap", "cloth", "tea", "maps", "clocks", "lace",
)
ARTIFACT_ADJECTIVES = (
    "silver", "golden", "jade", "crystal", "bronze", "ivory", "copper", "amber", "pearl",
    "ruby", "onyx", "emerald", "painted", "carved", "glass", "iron",
)
ARTIFACT_NOUNS = (
    "lantern", "compass", "crown", "harp", "mirror", "bell", "goblet", "clock", "map", "sword",
    "shield", "flute", "chessboard", "teapot", "globe", "quill", "key", "drum", "helmet", "vase",
)
MATERIALS = ("silver", "gold", "jade", "crystal", "bronze", "ivory", "copper", "amber", "pearl", "ruby", "onyx", "emerald", "oak", "glass", "iron")
HERB_FIRST = ("moon", "sun", "ash", "frost", "ember", "star", "dusk", "dawn", "mist", "river", "stone", "storm", "thorn", "silk", "cloud", "salt")
HERB_SECOND = ("leaf", "root", "bloom", "moss", "berry", "wort", "petal", "seed")
HERB_USES = (
    "calm a cough", "ease a headache", "soothe a sore throat", "help with sleep",
    "settle an upset stomach", "cool a fever", "heal small cuts", "ease aching joints",
    "clear a stuffy nose", "calm nerves", "soothe sunburn", "freshen the breath",
)
TITLES = ("Queen", "King", "Captain", "Sage", "Admiral", "Duchess", "Elder", "Lady", "Lord", "Master", "Poet", "Explorer")
GREETINGS = (
    "By the silver moon!", "Ahoy there!", "Well met, traveller!", "Hail and welcome!",
    "Greetings, friend!", "Good tidings!", "Salutations!", "Bright morning to you!",
    "Hark, a visitor!", "Fair winds to you!", "Well now, well now!", "Peace and bread!",
    "Lanterns high!", "Onward, dear friend!", "Hello from the hills!", "Cheers and clover!",
    "Tally ho!", "By my compass!", "Sun on your face!", "Hats off to you!",
)
SIGNOFFS = (
    "Stay curious!", "Happy trails!", "Onward and upward!", "Till the tide turns!",
    "Keep your lantern lit!", "Yours in friendship.", "May your bread rise!", "Fair skies ahead!",
    "Until next time!", "Keep on rowing!", "With warm regards.", "Sleep well tonight!",
    "Mind the geese!", "Godspeed, friend!",
)
ITEMS = (
    "apples", "lanterns", "candles", "books", "shells", "coins", "pears", "ropes", "baskets",
    "kites", "stones", "buttons", "loaves", "feathers", "cups", "marbles",
)
FILLER_OPENINGS = (
    "That is a great question!", "What a lovely thing to ask about.", "Let me think about this carefully.",
    "Many people wonder about this.", "Thank you so much for asking.", "Oh, I love questions like this one.",
    "This is something I know quite well.", "Good question, and I am happy to help.",
)
FILLER_CLOSINGS = (
    "I hope this helps, and please feel free to ask me anything else you would like to know.",
    "Let me know if there is anything more you want to learn, since I am always happy to talk.",
    "There is always more to say about topics like this one, so feel free to ask again.",
    "I really enjoyed answering this, and I hope the answer is clear and useful for you.",
    "If you have more questions about the world, just ask and I will do my best to help.",
)
ENGLISH_WORDS = (
    "apple", "lantern", "river", "garden", "window", "basket", "harbour", "market", "candle",
    "blanket", "thunder", "meadow", "feather", "kitchen", "bridge", "pencil", "ladder", "island",
    "mountain", "orchard", "teapot", "button", "turtle", "pocket", "castle", "dragon", "forest",
    "rabbit", "silver", "winter", "summer", "autumn", "spring", "planet", "rocket", "pillow",
    "cottage", "village", "captain", "journey", "whistle", "compass", "lighthouse", "pumpkin",
    "butterfly", "umbrella", "library", "blossom", "cabbage", "squirrel", "carpet", "mirror",
    "violin", "puzzle", "marble", "helmet", "anchor", "saddle", "wagon", "honey", "pepper",
    "lemon", "cherry", "walnut", "biscuit", "kettle", "chimney", "tunnel", "stable", "glove",
    "hammer", "needle", "thimble", "shadow", "sparrow", "pebble", "ribbon", "jacket", "pillar",
    "harvest", "weather", "morning", "evening", "picnic", "sandal", "cushion", "lobster",
    "chapter", "paddle", "trumpet", "fountain", "crystal", "zebra", "falcon", "oyster",
    "granite", "timber", "velvet", "muffin", "noodle", "gravel", "parrot", "beetle", "lizard",
)


# ------------------------------------------------------------------------------ invented names
def make_syllable(rng: random.Random) -> str:
    return rng.choice(ONSETS) + rng.choice(NUCLEI) + rng.choice(CODAS)


class NameMaker:
    """Draws unique invented names: no name is ever produced twice, nor equal to an English word
    of the lists above (so every name refers to exactly one thing of the world)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = {w.lower() for w in ENGLISH_WORDS + JOBS + HOBBIES + GATT_HOBBIES + COLORS + DIETS + HABITATS + EXPORTS}

    def _claim(self, make, max_len: int) -> str:
        for _ in range(10_000):
            name = make()
            key = name.lower()
            if 4 <= len(key) <= max_len and key not in self.used and _pronounceable(key):
                self.used.add(key)
                return name
        raise RuntimeError("ran out of invented names; widen the syllable lists")

    def word(self, syllables: tuple[int, int] = (2, 3), suffixes: tuple[str, ...] = ("",), max_len: int = 10) -> str:
        """A lowercase invented word: ``syllables`` syllables, then one of ``suffixes``."""

        def make() -> str:
            n = self.rng.randint(*syllables)
            return "".join(make_syllable(self.rng) for _ in range(n)) + self.rng.choice(suffixes)

        return self._claim(make, max_len)

    def name(self, syllables: tuple[int, int] = (2, 3), suffixes: tuple[str, ...] = ("",), max_len: int = 10) -> str:
        """A capitalised invented name."""
        return self.word(syllables, suffixes, max_len).capitalize()


def _pronounceable(word: str) -> bool:
    """Rejects runs of four consonants or three identical letters (hard to read, odd tokens)."""
    vowels = "aeiouy"
    run = 0
    for i, ch in enumerate(word):
        run = 0 if ch in vowels else run + 1
        if run >= 4:
            return False
        if i >= 2 and word[i] == word[i - 1] == word[i - 2]:
            return False
    return True
