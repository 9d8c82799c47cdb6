"""A small English-like corpus of the project's own making, for offline runs.

Documents are short stories drawn from a fixed grammar with a seeded RNG, so the
same corpus is produced everywhere, with no third-party text. The structure
(agreement, recurring characters, topic words) gives a model something to learn.
"""
import random

NAMES = ['Ada', 'Ben', 'Clara', 'Dev', 'Elena', 'Farid', 'Grace', 'Hugo',
         'Iris', 'Jonas', 'Kemi', 'Leo', 'Maya', 'Nils', 'Olga', 'Pavel']
PLACES = {
    'harbour': (['boat', 'net', 'gull', 'rope', 'lighthouse', 'wave'],
                ['sailed', 'fished', 'waited', 'rowed']),
    'forest': (['oak', 'fox', 'path', 'river', 'mushroom', 'owl'],
               ['walked', 'climbed', 'listened', 'wandered']),
    'market': (['bread', 'apple', 'coin', 'basket', 'cheese', 'stall'],
               ['bought', 'sold', 'counted', 'bargained']),
    'workshop': (['hammer', 'wheel', 'clock', 'nail', 'lamp', 'bench'],
                 ['built', 'fixed', 'measured', 'painted']),
    'school': (['book', 'map', 'lesson', 'chalk', 'garden', 'bell'],
               ['read', 'wrote', 'studied', 'drew']),
    'mountain': (['rock', 'snow', 'goat', 'cabin', 'peak', 'trail'],
                 ['climbed', 'rested', 'searched', 'camped']),
}
ADJECTIVES = ['old', 'small', 'bright', 'quiet', 'heavy', 'green', 'warm',
              'broken', 'tall', 'gentle', 'strange', 'careful']
TIMES = ['In the morning', 'At noon', 'Late in the evening', 'The next day',
         'Before dawn', 'After the rain', 'On Sunday', 'That winter']
FEELINGS = ['happy', 'tired', 'curious', 'proud', 'worried', 'calm']
ENDINGS = ['and went home', 'and smiled', 'and told a friend',
           'and wrote it down', 'and fell asleep', 'and felt {feeling}']


def _sentence(rng, person, friend, place):
  things, verbs = PLACES[place]
  thing, other = rng.sample(things, 2)
  adjective = rng.choice(ADJECTIVES)
  verb = rng.choice(verbs)
  ending = rng.choice(ENDINGS).format(feeling=rng.choice(FEELINGS))
  templates = [
      f'{rng.choice(TIMES)}, {person} {verb} near the {adjective} {thing}.',
      f'{person} saw a {adjective} {thing} by the {other} {ending}.',
      f'"Look at the {thing}," said {person} to {friend}.',
      f'{friend} {verb} with {person} at the {place} {ending}.',
      f'The {thing} was {adjective}, so {person} {verb} a little longer.',
      f'Everyone at the {place} knew the {adjective} {thing} of {person}.',
      f'{person} and {friend} {verb} until the {other} was {adjective}.',
  ]
  return rng.choice(templates)


def _document(rng):
  person, friend = rng.sample(NAMES, 2)
  place = rng.choice(list(PLACES))
  title = f'{person} and the {rng.choice(PLACES[place][0])}'
  paragraphs = []
  for _ in range(rng.randint(2, 5)):
    sentences = [_sentence(rng, person, friend, place)
                 for _ in range(rng.randint(3, 7))]
    paragraphs.append(' '.join(sentences))
  return title + '\n\n' + '\n\n'.join(paragraphs)


def generate(num_documents=4000, seed=0):
  """Yields `num_documents` story documents, the same for the same seed."""
  rng = random.Random(seed)
  for _ in range(num_documents):
    yield _document(rng)
