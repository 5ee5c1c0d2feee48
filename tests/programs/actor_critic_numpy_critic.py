"""Actor Critic whose critic value is converted with .numpy() inside the tape: the critic head never trains.

keras-io "Actor Critic Method" (https://keras.io/examples/rl/actor_critic_cartpole/), run eagerly as there (one
model with a common layer, an actor head and a critic head, the episode inside one GradientTape), with the bug of
the Stack Overflow question mirrored at https://jtuto.com/why-does-gradienttape-behave-differently-when-watching-loop-operations-as-opposed-to-array-operations/
and countless others: the critic's value is stored as a NumPy number (`critic_value[0, 0].numpy()`) to build the
losses, so the Huber critic loss is computed from a copy the tape cannot follow. The actor loss still trains the
common layer and the actor head, so Keras only warns.
Expected gradtel outcome: `gradtel check` exit 1; the critic head's kernel and bias missing with cause
`left_tensorflow` at the .numpy() line (marked CULPRIT); the script runs to the end (exit 0).
"""

import keras
import numpy as np
import tensorflow as tf
from keras import layers

keras.utils.set_random_seed(0)  # one run is judged: the same initialisation every time

EXPECT = {
    "check_exit": 1,
    "run_exit": 0,
    "optimizers": 1,
    "stepping": 1,
    "missing": {"critic/kernel": "left_tensorflow", "critic/bias": "left_tensorflow"},
}

gamma = 0.99
max_steps_per_episode = 12
eps = np.finfo(np.float32).eps.item()
rng = np.random.default_rng(0)


class ToyEnv:
    """CartPole-shaped stand-in: 4 observations, 2 actions, reward 1 per step, ends after a few steps."""

    def reset(self):
        self.t = 0
        return rng.normal(size=4).astype("float32")

    def step(self, action):
        self.t += 1
        return rng.normal(size=4).astype("float32"), 1.0, self.t >= 8


env = ToyEnv()
num_inputs, num_actions, num_hidden = 4, 2, 16
inputs = layers.Input(shape=(num_inputs,))
common = layers.Dense(num_hidden, activation="relu", name="common")(inputs)
action = layers.Dense(num_actions, activation="softmax", name="actor")(common)
critic = layers.Dense(1, name="critic")(common)
model = keras.Model(inputs=inputs, outputs=[action, critic])

optimizer = keras.optimizers.Adam(learning_rate=0.01)
huber_loss = keras.losses.Huber()
action_probs_history, critic_value_history, rewards_history = [], [], []

for episode_count in range(3):
    state = env.reset()
    with tf.GradientTape() as tape:
        for timestep in range(1, max_steps_per_episode):
            state = keras.ops.convert_to_tensor(state)
            state = keras.ops.expand_dims(state, 0)
            action_probs, critic_value = model(state)
            critic_value_history.append(critic_value[0, 0].numpy())  # CULPRIT
            action = rng.choice(num_actions, p=np.squeeze(action_probs))
            action_probs_history.append(keras.ops.log(action_probs[0, action]))
            state, reward, done = env.step(action)
            rewards_history.append(reward)
            if done:
                break

        returns, discounted_sum = [], 0
        for r in rewards_history[::-1]:
            discounted_sum = r + gamma * discounted_sum
            returns.insert(0, discounted_sum)
        returns = np.array(returns)
        returns = (returns - np.mean(returns)) / (np.std(returns) + eps)
        returns = returns.tolist()

        actor_losses, critic_losses = [], []
        for log_prob, value, ret in zip(action_probs_history, critic_value_history, returns):
            diff = ret - value
            actor_losses.append(-log_prob * diff)
            critic_losses.append(huber_loss(keras.ops.expand_dims(value, 0), keras.ops.expand_dims(ret, 0)))
        loss_value = sum(actor_losses) + sum(critic_losses)
        grads = tape.gradient(loss_value, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        action_probs_history.clear()
        critic_value_history.clear()
        rewards_history.clear()
