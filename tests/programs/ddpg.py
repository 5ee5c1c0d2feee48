"""DDPG: actor, critic, target actor and target critic; the targets follow by a tf.function that assigns.

Adapted from keras-io "Deep Deterministic Policy Gradient (DDPG)" (https://keras.io/examples/rl/ddpg_pendulum/):
same get_actor/get_critic models, Buffer with a @tf.function update() holding the critic and actor GradientTapes
(target_actor and target_critic read inside the critic tape), two Adam optimizers, and the @tf.function
update_target that moves the targets with assign (given the models, since Keras 3 variables passed to a
tf.function in a list arrive as tensors). The target networks are never
given to an optimizer, by design. A synthetic Pendulum-shaped environment replaces gym.
Expected gradtel outcome: healthy, both optimizers step, no finding (`gradtel check` exit 0); the target networks
are only a note (tracked variables no optimizer receives).
"""

import keras
import numpy as np
import tensorflow as tf
from keras import layers

EXPECT = {"check_exit": 0, "run_exit": 0, "optimizers": 2, "stepping": 2}

# Seeded: unseeded, about one initialisation in six leaves the critic's ReLU units dead for the buffer's one sample
# at the first step, the actor's gradient is exactly 0 (measured without gradtel), and `gradtel check`, judging
# that step, rightly fails.
keras.utils.set_random_seed(0)
num_states, num_actions, upper_bound = 3, 1, 2.0
rng = np.random.default_rng(0)


def get_actor():
    last_init = keras.initializers.RandomUniform(minval=-0.003, maxval=0.003)
    inputs = layers.Input(shape=(num_states,))
    out = layers.Dense(16, activation="relu")(inputs)
    out = layers.Dense(16, activation="relu")(out)
    outputs = layers.Dense(1, activation="tanh", kernel_initializer=last_init)(out)
    outputs = outputs * upper_bound
    return keras.Model(inputs, outputs)


def get_critic():
    state_input = layers.Input(shape=(num_states,))
    state_out = layers.Dense(8, activation="relu")(state_input)
    action_input = layers.Input(shape=(num_actions,))
    action_out = layers.Dense(8, activation="relu")(action_input)
    concat = layers.Concatenate()([state_out, action_out])
    out = layers.Dense(16, activation="relu")(concat)
    outputs = layers.Dense(1)(out)
    return keras.Model([state_input, action_input], outputs)


actor_model, critic_model = get_actor(), get_critic()
target_actor, target_critic = get_actor(), get_critic()
target_actor.set_weights(actor_model.get_weights())
target_critic.set_weights(critic_model.get_weights())
critic_optimizer = keras.optimizers.Adam(0.002)
actor_optimizer = keras.optimizers.Adam(0.001)
gamma, tau = 0.99, 0.005


class Buffer:
    def __init__(self, buffer_capacity=64, batch_size=8):
        self.buffer_capacity, self.batch_size, self.buffer_counter = buffer_capacity, batch_size, 0
        self.state_buffer = np.zeros((buffer_capacity, num_states), "float32")
        self.action_buffer = np.zeros((buffer_capacity, num_actions), "float32")
        self.reward_buffer = np.zeros((buffer_capacity, 1), "float32")
        self.next_state_buffer = np.zeros((buffer_capacity, num_states), "float32")

    def record(self, obs_tuple):
        index = self.buffer_counter % self.buffer_capacity
        self.state_buffer[index], self.action_buffer[index] = obs_tuple[0], obs_tuple[1]
        self.reward_buffer[index], self.next_state_buffer[index] = obs_tuple[2], obs_tuple[3]
        self.buffer_counter += 1

    @tf.function
    def update(self, state_batch, action_batch, reward_batch, next_state_batch):
        with tf.GradientTape() as tape:
            target_actions = target_actor(next_state_batch, training=True)
            y = reward_batch + gamma * target_critic([next_state_batch, target_actions], training=True)
            critic_value = critic_model([state_batch, action_batch], training=True)
            critic_loss = keras.ops.mean(keras.ops.square(y - critic_value))
        critic_grad = tape.gradient(critic_loss, critic_model.trainable_variables)
        critic_optimizer.apply_gradients(zip(critic_grad, critic_model.trainable_variables))

        with tf.GradientTape() as tape:
            actions = actor_model(state_batch, training=True)
            critic_value = critic_model([state_batch, actions], training=True)
            actor_loss = -keras.ops.mean(critic_value)
        actor_grad = tape.gradient(actor_loss, actor_model.trainable_variables)
        actor_optimizer.apply_gradients(zip(actor_grad, actor_model.trainable_variables))

    def learn(self):
        record_range = min(self.buffer_counter, self.buffer_capacity)
        batch_indices = rng.choice(record_range, self.batch_size)
        self.update(
            keras.ops.convert_to_tensor(self.state_buffer[batch_indices]),
            keras.ops.convert_to_tensor(self.action_buffer[batch_indices]),
            keras.ops.convert_to_tensor(self.reward_buffer[batch_indices]),
            keras.ops.convert_to_tensor(self.next_state_buffer[batch_indices]),
        )


@tf.function
def update_target(target, original, tau):
    for a, b in zip(target.variables, original.variables):
        a.assign(b * tau + a * (1 - tau))


def policy(state):
    sampled_actions = keras.ops.squeeze(actor_model(state))
    return [np.clip(sampled_actions.numpy() + rng.normal(scale=0.2), -upper_bound, upper_bound)]


buffer = Buffer()
for ep in range(1):
    prev_state = rng.normal(size=num_states).astype("float32")
    for t in range(12):
        action = policy(keras.ops.expand_dims(keras.ops.convert_to_tensor(prev_state), 0))
        state, reward = rng.normal(size=num_states).astype("float32"), -float(np.square(action[0]))
        buffer.record((prev_state, action, reward, state))
        buffer.learn()
        update_target(target_actor, actor_model, tau)
        update_target(target_critic, critic_model, tau)
        prev_state = state
