// The perfTest's no-op task: does nothing unless the payload id is 999.
module.exports = async (payload) => {
  if (payload && payload.id === 999) console.log("job 999 ran");
};
