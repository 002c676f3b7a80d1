"""Names of the synthetic world's groups, occupations, proxies and legacy object classes.

They live apart from world.py so that the modules which assemble the world (captions.py,
scenes.py) can read them without importing world.py; world.py re-exports every one.
"""

GROUPS = ("man", "woman")
# In pairs; the first of each pair is stereotypically female.
OCCUPATIONS = ("librarian", "scientist", "nurse", "doctor", "housekeeper",
               "homeowner", "receptionist", "executive", "secretary",
               "manager")
OCCUPATION_PAIRS = [(i, i + 1) for i in range(0, len(OCCUPATIONS), 2)]
# PROXIES[j] is the object that co-occurs with OCCUPATIONS[j].
PROXIES = ("book", "microscope", "thermometer", "stethoscope", "broom", "sofa",
           "telephone", "briefcase", "typewriter", "laptop")
# The legacy object scenes' classes (object_scenes='legacy'); composed scenes name theirs with
# world.object_class_names(cfg).
OBJECT_CLASSES = ("ball", "box", "tree", "car", "cup", "star", "house", "fish",
                  "key", "moon")
SPLITS = ("train", "objects", "people", "retrieval")
# Caption nouns per group (GROUPS order); "person" when the group is unnamed.
GROUP_NOUNS = (("man", "gentleman", "guy", "male person"),
               ("woman", "lady", "girl", "female person"))
NEUTRAL_NOUN = "person"
